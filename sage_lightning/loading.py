"""Where weights come from: diffusers pipelines (hub id or folder), the tiny random stack, ShapesWorld.

This is the only module that knows paths and hub ids. Everything returns plain diffusers /
transformers objects, so a tiny model, ShapesWorld and Stable Diffusion go through the same code.
"""

from __future__ import annotations

import gzip
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sage_lightning.errors import SageError, closest_names

SHAPESWORLD_DIR = Path(__file__).parent / "shapesworld" / "weights"
TOKENIZER_CACHE = Path(os.environ.get("SAGE_CACHE", Path.home() / ".cache" / "sage_lightning")) / "clip_bpe"

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-trailing": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "dpm++-sde": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
}
# Config a scheduler name sets on top of the model's scheduler config.
SCHEDULER_OVERRIDES: dict[str, dict] = {
    "euler-trailing": {"timestep_spacing": "trailing"},  # "euler" keeps the model's spacing (SDXL: leading)
    "dpm++": {"algorithm_type": "dpmsolver++"},
    "dpm++-sde": {"algorithm_type": "sde-dpmsolver++"},
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class DiffusionModel:
    """The parts of a latent text-to-image model that SAGE differentiates through (all frozen)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: SchedulerMixin
    name: str = "model"
    sets_begin_index = False  # class attribute: the pipeline's loop calls ``scheduler.set_begin_index(0)``

    def components(self) -> dict:
        """The modules every Stable Diffusion pipeline is built from (shared, not copied)."""
        return {"vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer, "unet": self.unet,
                "scheduler": self.scheduler}

    def pipeline(self) -> StableDiffusionPipeline:
        """The equivalent diffusers pipeline (shares the modules; no safety checker)."""
        return StableDiffusionPipeline(
            **self.components(), safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, self.text_encoder]

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (as diffusers' pipelines compute it)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """Side of the images the pipeline makes by default (UNet sample size x VAE scale factor)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def freeze(self) -> DiffusionModel:
        for module in self.modules():
            module.requires_grad_(False).eval()
        return self

    def keeps_float32(self, module: torch.nn.Module, dtype: torch.dtype | None) -> bool:
        """Whether ``module`` stays float32 when the model is cast to ``dtype`` (SD 1.x: never)."""
        return False

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DiffusionModel:
        for module in self.modules():
            module_dtype = torch.float32 if self.keeps_float32(module, dtype) else dtype
            kwargs = {"device": device} if module_dtype is None else {"device": device, "dtype": module_dtype}
            if module_dtype is not None and not getattr(module, "_keep_in_fp32_modules", None):
                with _diffusers_errors_only():  # diffusers 0.42 warns on every cast, even with no module to keep
                    module.to(**kwargs)
            else:
                module.to(**kwargs)
        return self



@dataclass
class DiffusionXLModel(DiffusionModel):
    """Stable Diffusion XL: a second text encoder (with projection: the pooled text embedding) and the
    UNet's micro-conditioning ``add_time_ids`` = original size, crop top-left, target size (None: the
    image size, as the pipeline's defaults). ``force_zeros_for_empty_prompt``: the unconditional branch
    is all zeros (the pipeline's default when no negative prompt is given)."""

    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    force_zeros_for_empty_prompt: bool = True
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    sets_begin_index = True

    def pipeline(self) -> StableDiffusionXLPipeline:
        """The equivalent diffusers pipeline (shares the modules; no watermark)."""
        return StableDiffusionXLPipeline(
            **self.components(), text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt, add_watermarker=False,
        )

    def pipeline_kwargs(self) -> dict:
        """The micro-conditioning as ``StableDiffusionXLPipeline.__call__`` arguments."""
        size = (self.image_size, self.image_size)
        return {
            "original_size": self.original_size or size,
            "crops_coords_top_left": self.crops_coords_top_left,
            "target_size": self.target_size or size,
        }

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, self.text_encoder, self.text_encoder_2]

    def keeps_float32(self, module: torch.nn.Module, dtype: torch.dtype | None) -> bool:
        """The VAE stays float32 in a float16 model when its config says ``force_upcast`` (SDXL's VAE overflows
        in float16): what the pipeline does by upcasting it for every decode."""
        return module is self.vae and dtype == torch.float16 and bool(self.vae.config.get("force_upcast", False))

    def add_time_ids(self) -> torch.Tensor:
        """``[1, 6]`` float32: original size, crop top-left, target size (the pipeline's ``_get_add_time_ids``)."""
        kw = self.pipeline_kwargs()
        ids = list(kw["original_size"]) + list(kw["crops_coords_top_left"]) + list(kw["target_size"])
        expected = self.unet.config.projection_class_embeddings_input_dim
        got = self.unet.config.addition_time_embed_dim * len(ids) + self.text_encoder_2.config.projection_dim
        if expected != got:
            raise SageError(f"SDXL UNet expects {expected} added embedding features, the text encoder gives {got}")
        return torch.tensor([ids], dtype=torch.float32)

@contextmanager
def _diffusers_errors_only():
    """Silence diffusers' warnings for the block (its other log levels are restored after)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


# ---------------------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-printable mapping (as in open_clip's SimpleTokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_clip_bpe_files(folder: Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of the real CLIP BPE (49408 tokens) into ``folder``.

    Built offline from ``bpe_simple_vocab_16e6.txt.gz`` that open_clip ships, in the order open_clip's
    ``SimpleTokenizer`` uses, so ids equal open_clip's (and OpenAI CLIP's / Stable Diffusion 1.x's).
    """
    import open_clip.tokenizer as oct

    with gzip.open(oct.default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    tmp_vocab, tmp_merges = folder / "vocab.json.tmp", folder / "merges.txt.tmp"
    tmp_vocab.write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    tmp_merges.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tmp_vocab.replace(folder / "vocab.json")
    tmp_merges.replace(folder / "merges.txt")
    return folder


@lru_cache(maxsize=4)
def clip_tokenizer(folder: str | None = None, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The Stable Diffusion 1.x CLIP tokenizer (pads with ``<|endoftext|>``), built offline.

    ``pad_token="!"``: SDXL's second tokenizer (OpenCLIP's padding, id 0), same vocabulary."""
    path = Path(folder) if folder else TOKENIZER_CACHE
    if not (path / "vocab.json").exists() or not (path / "merges.txt").exists():
        write_clip_bpe_files(path)
    return CLIPTokenizer.from_pretrained(str(path), local_files_only=True, model_max_length=77, pad_token=pad_token)


# ------------------------------------------------------------------------------------- tiny stack
def _test_vae(seed: int, sample_size: int) -> AutoencoderKL:
    """diffusers' test VAE (32, 64): scale factor 2, seeded."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=sample_size,
        norm_num_groups=32,
    )


def _test_clip_config(hidden: int, layers: int, **extra) -> CLIPTextConfig:
    """diffusers' test CLIP text config on the real 49408-token vocabulary (EOS 49407)."""
    return CLIPTextConfig(
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=layers,
        vocab_size=49408,
        max_position_embeddings=77,
        **extra,
    )


def _tiny_unet(seed: int, **config) -> UNet2DConditionModel:
    """diffusers' test UNet on 32x32x4 latents (one plain and one cross-attention block), seeded."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        **config,
    )


def build_tiny(seed: int = 0, prediction_type: str = "epsilon", hidden: int = 32) -> DiffusionModel:
    """A Stable-Diffusion-shaped stack with random weights (as diffusers' ``get_dummy_components``).

    UNet 32x32x4 latents, a VAE with scale factor 2 (64 px images), a 2-layer CLIP text encoder on
    the real 49408-token vocabulary, DDIM. Seeded: the same seed gives the same weights.
    """
    unet = _tiny_unet(seed, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=hidden,
                      norm_num_groups=32)
    vae = _test_vae(seed, sample_size=64)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_test_clip_config(hidden, layers=2))
    scheduler = _tiny_scheduler(prediction_type)
    return DiffusionModel(unet, vae, text_encoder, clip_tokenizer(), scheduler, name="tiny").freeze()


def build_tiny_xl(seed: int = 0) -> DiffusionXLModel:
    """A Stable-Diffusion-XL-shaped stack with random weights, as diffusers' SDXL ``get_dummy_components``.

    UNet (2, 4) with ``text_time`` added conditioning on 32x32x4 latents, a VAE with scale factor 2 (64 px),
    two 5-layer CLIP text encoders (the second with a projection: the pooled embedding) on the real
    49408-token vocabulary, EulerDiscrete with "leading" spacing. Seeded: the same seed, the same weights.
    """
    unet = _tiny_unet(
        seed,
        block_out_channels=(2, 4),
        layers_per_block=2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
        cross_attention_dim=64,  # 32 + 32: both encoders' hidden states side by side
        norm_num_groups=1,
    )
    vae = _test_vae(seed, sample_size=128)
    config = _test_clip_config(32, layers=5, hidden_act="gelu", projection_dim=32)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(config)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    return DiffusionXLModel(
        unet, vae, text_encoder, clip_tokenizer(), _tiny_xl_scheduler(), name="tiny-xl",
        text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer(pad_token="!"),
    ).freeze()


def _tiny_xl_scheduler() -> EulerDiscreteScheduler:
    """SDXL's default scheduler family: Euler discrete, "leading" spacing (as diffusers' SDXL tests)."""
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear", timestep_spacing="leading"
    )


# Built-in sources with random weights (debugging and tests): name -> builder(seed=...).
TINY_SOURCES: dict = {"tiny": build_tiny, "tiny-xl": build_tiny_xl}
# issue 23 hook: other model families register (load, load_scheduler) here when imported (flow_models: SD3 / FLUX,
# imported by sage_lightning/__init__.py); each returns None for a source that is not its own.
FAMILY_LOADERS: list = []


def _tiny_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=prediction_type,
        steps_offset=1,
    )


# ---------------------------------------------------------------------------------------- loading
def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise SageError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def make_scheduler(name: str, config: dict) -> SchedulerMixin:
    """A scheduler of family ``name`` (see ``SCHEDULERS``) from another scheduler's config."""
    key = name.lower()
    if key not in SCHEDULERS:
        raise SageError(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[key].from_config(config, **SCHEDULER_OVERRIDES.get(key, {}))


def check_scheduler(scheduler: SchedulerMixin, source: str) -> SchedulerMixin:
    """The model's own scheduler if the sampler supports it (its noise, if any, is seeded per target and
    parity with diffusers' pipeline is tested); SageError otherwise, never a silent fallback."""
    supported = {cls.__name__ for cls in SCHEDULERS.values()}
    if type(scheduler).__name__ not in supported:
        raise SageError(
            f"model {source!r} ships {type(scheduler).__name__}, which sage does not support: set "
            f"model.init_args.scheduler to one of {', '.join(SCHEDULERS)}"
        )
    return scheduler


@lru_cache(maxsize=16)
def load_scheduler(source: str, scheduler: str | None = "ddim", local_files_only: bool = False) -> SchedulerMixin:
    """The scheduler :func:`load_diffusion` would use, from the scheduler's config alone (no weights):
    budgets and step counts come from its own timesteps before the model loads."""
    import diffusers

    for _, family_scheduler in FAMILY_LOADERS if source not in TINY_SOURCES and source != "shapesworld" else ():
        if (family_own := family_scheduler(source, scheduler, local_files_only)) is not None:  # issue 23 hook
            return family_own
    if source in TINY_SOURCES:
        own: SchedulerMixin = _tiny_scheduler() if source == "tiny" else _tiny_xl_scheduler()
    else:
        path, is_local = check_source(source)
        try:
            config = diffusers.DDIMScheduler.load_config(  # any scheduler class reads scheduler_config.json
                str(path) if is_local else source, subfolder="scheduler", local_files_only=local_files_only or is_local
            )
        except (OSError, ValueError) as err:
            raise SageError(f"cannot read the scheduler of model {source!r}: check the hub id or folder") from err
        cls = getattr(diffusers, str(config.get("_class_name")), None)
        if cls is None:
            raise SageError(f"model {source!r} names an unknown scheduler {config.get('_class_name')!r}")
        own = cls.from_config(config)
    chosen = own if scheduler is None else make_scheduler(scheduler, own.config)
    return check_scheduler(chosen, source)


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith((".", "/", "~"))
        or os.sep in source.strip("/").split("/", 1)[-1]
        or Path(source).expanduser().exists()
    )


def check_source(source: str) -> tuple[Path, bool]:
    """Where ``source`` points and whether it is local; SageError at once for a missing folder."""
    if source in TINY_SOURCES:
        return Path(), True
    path = SHAPESWORLD_DIR / "pipeline" if source == "shapesworld" else Path(source).expanduser()
    if source == "shapesworld" and not (path / "model_index.json").exists():
        raise SageError(
            f"ShapesWorld weights are missing at {path}: reinstall sage-lightning or rebuild them "
            "with `sage-shapesworld build`"
        )
    is_local = source == "shapesworld" or _looks_like_path(source)
    if is_local and not (path / "model_index.json").exists():
        why = "does not exist" if not path.exists() else "has no model_index.json"
        raise SageError(
            f"model folder {str(path)!r} {why}: pass a folder written by save_pretrained, a hub id, "
            "'shapesworld', 'tiny' or 'tiny-xl'"
        )
    return path, is_local


def load_diffusion(
    source: str = "shapesworld",
    *,
    scheduler: str | None = "ddim",
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    local_files_only: bool = False,
    seed: int = 0,
) -> DiffusionModel:
    """Load a text-to-image latent diffusion model, frozen.

    ``source``: ``"shapesworld"`` (the embedded default), ``"tiny"`` / ``"tiny-xl"`` (random weights, ``seed``),
    a local folder saved by ``save_pretrained`` of a ``StableDiffusionPipeline`` or a ``StableDiffusionXLPipeline``,
    or a hub id such as ``"runwayml/stable-diffusion-v1-5"`` or ``"stabilityai/stable-diffusion-xl-base-1.0"``.
    ``scheduler`` replaces the pipeline's scheduler by that family (None keeps it).
    """
    torch_dtype = _resolve_dtype(dtype)
    for family_load, _ in FAMILY_LOADERS if source not in TINY_SOURCES and source != "shapesworld" else ():
        family_model = family_load(source, scheduler=scheduler, dtype=dtype, device=device,  # issue 23 hook
                                   local_files_only=local_files_only, seed=seed)
        if family_model is not None:
            return family_model
    if source in TINY_SOURCES:
        model = TINY_SOURCES[source](seed=seed)
    else:
        model = _load_pipeline(source, local_files_only)
    if scheduler is not None:
        model.scheduler = make_scheduler(scheduler, model.scheduler.config)
    check_scheduler(model.scheduler, source)
    return model.freeze().to(device, None if torch_dtype == torch.float32 else torch_dtype)


def _load_pipeline(source: str, local_files_only: bool) -> DiffusionModel:
    """A ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` folder / hub id (by its model_index.json)."""
    path, is_local = check_source(source)
    where, offline = (str(path) if is_local else source), local_files_only or is_local
    try:
        index = StableDiffusionPipeline.load_config(where, local_files_only=offline)
        if index.get("_class_name") == StableDiffusionXLPipeline.__name__:
            xl = StableDiffusionXLPipeline.from_pretrained(where, local_files_only=offline, add_watermarker=False)
            return DiffusionXLModel(
                xl.unet, xl.vae, xl.text_encoder, xl.tokenizer, xl.scheduler, name=source,
                text_encoder_2=xl.text_encoder_2, tokenizer_2=xl.tokenizer_2,
                force_zeros_for_empty_prompt=bool(xl.config.force_zeros_for_empty_prompt),
            )
        pipe = StableDiffusionPipeline.from_pretrained(
            where, local_files_only=offline, safety_checker=None, requires_safety_checker=False
        )
    except (OSError, ValueError) as err:
        raise _load_error("model", source, err) from err
    return DiffusionModel(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, name=source)


def check_lm_source(source: str) -> tuple[Path, bool]:
    """Where a causal language model ``source`` points and whether it is local (``"shapesworld"``: the world's
    own LM); SageError at once for a missing folder."""
    if source == "shapesworld":
        path = SHAPESWORLD_DIR / "lm"
        if not (path / "config.json").exists():
            raise SageError(f"ShapesWorld's language model is missing at {path}: reinstall sage-lightning")
        return path, True
    path = Path(source).expanduser()
    local = source.startswith((".", "/", "~")) or path.exists()
    if local and not (path / "config.json").exists():
        raise SageError(f"language model folder {source!r} does not exist or has no config.json")
    return path, local


def load_causal_lm(source: str, local_files_only: bool = False, device: str = "cpu"):
    """``(tokenizer, model)`` of a Hugging Face causal LM (hub id, folder or ``"shapesworld"``), frozen, float32,
    on ``device``; ``trust_remote_code`` is never set (prompt search's candidate words)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, is_local = check_lm_source(source)
    where, offline = (str(path) if is_local else source), local_files_only or is_local
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=offline, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            where, local_files_only=offline, trust_remote_code=False, dtype=torch.float32
        )
    except (OSError, ValueError) as err:
        raise _load_error("the candidate language model", source, err) from err
    return tokenizer, model.requires_grad_(False).eval().to(device)


def _load_error(what: str, source: str, err: Exception) -> SageError:
    """One line for a hub id or folder that does not load: the first line of the library's reason."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return SageError(
        f"cannot load {what} {source!r} ({first[:200]}): check the hub id or folder, or your network / "
        "`local_files_only`"
    )


def known_sources() -> list[str]:
    return ["shapesworld", *TINY_SOURCES, "tiny-sd3", "tiny-flux"]  # issue 23: the tiny flow stacks


__all__ = [
    "DiffusionModel",
    "DiffusionXLModel",
    "build_tiny",
    "build_tiny_xl",
    "clip_tokenizer",
    "load_diffusion",
    "make_scheduler",
    "write_clip_bpe_files",
    "closest_names",
]


# ------------------------------------------------------------------------------ default ensembles
# ShapesWorld's shipped classifiers, in the default ensemble's order (shapesworld/classifiers.py trains them;
# it imports this module, never the other way round).
SHAPESWORLD_MEMBERS = ("resnet", "densenet", "edge")


def shapesworld_member(folder: Path):
    """A shipped ShapesWorld classifier folder (``config.json`` + ``model.safetensors``) as a surrogate member:
    ``TimmMember``, wrapped in ``CannyEdgeMember`` for the edge classifier."""
    from sage_lightning.surrogate.members import CannyEdgeMember, TimmMember

    cfg = json.loads((folder / "config.json").read_text())
    member = TimmMember(cfg["model_name"], list(cfg["class_names"]), checkpoint_path=str(folder / "model.safetensors"),
                        model_kwargs=cfg["model_kwargs"], reject_names=cfg.get("reject_names"))
    if cfg["input"] == "canny":
        c = cfg["canny"]
        return CannyEdgeMember(member, c["low_threshold"], c["high_threshold"], c["l2_gradient"], c["black_on_white"],
                               c.get("stretch_contrast", False))
    return member


def _tiny_shape_names() -> list[str]:
    from sage_lightning.shapesworld.generator import SHAPES

    return list(SHAPES)


# The world's D looks at every image in six nuisance views (surrogate/views.py): SAGE must change what each shows.
SHAPESWORLD_VIEWS = ("image", "gbr", "brg", "gray", "blur", "half")


def default_ensemble(source: str):
    """The discriminator D that goes with a model source when the config names none.

    ``shapesworld``: the world's own classifiers (two timm architectures and the Canny-edge member), in the
    nuisance views ``SHAPESWORLD_VIEWS``.
    ``tiny``, ``tiny-xl``: random timm test models on the ShapesWorld class names (debugging only: meaningless).
    Other sources have no default: a config must list the members (see configs/models/).
    """
    from sage_lightning.surrogate import CannyEdgeMember, ClassifierEnsemble, TimmMember

    if source in TINY_SOURCES or source in ("tiny-sd3", "tiny-flux"):  # issue 23: the tiny flow stacks too
        names = _tiny_shape_names()
        with torch.random.fork_rng(devices=[]):  # fixed random weights; the caller's global state is left as it was
            torch.manual_seed(0)
            members = [TimmMember("test_resnet", names), TimmMember("test_vit", names)]
            members.append(CannyEdgeMember(TimmMember("test_resnet", names)))
        return ClassifierEnsemble(members)
    if source == "shapesworld":
        folder = SHAPESWORLD_DIR / "classifiers"
        shipped = [name for name in SHAPESWORLD_MEMBERS if (folder / name / "config.json").exists()]
        if not shipped:
            raise SageError(f"ShapesWorld classifiers are missing in {folder}: rebuild them (`sage-shapesworld build`)")
        return ClassifierEnsemble([shapesworld_member(folder / name) for name in shipped], views=SHAPESWORLD_VIEWS)
    raise SageError(
        f"model {source!r} has no default ensemble: list the members under model.ensemble in the config "
        "(see configs/models/sd15.yaml)"
    )


# ------------------------------------------------------------------------------------------------- CLIP
class _FeatureTensors(torch.nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return tensors (with transformers 5
    they return model outputs, where torchmetrics' ``CLIPScore`` expects the projected feature tensors)."""

    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.config = clip.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.clip.get_text_features(*args, **kwargs))


def _shapesworld_processor(folder: Path, image_size: int):
    """ShapesWorld's CLIP convention (world.pixel_values): 64 px, [0, 1] -> [-1, 1], no crop."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=CLIPTokenizer.from_pretrained(str(folder)))


def load_clip(model: str = "shapesworld", local_files_only: bool = False) -> tuple[torch.nn.Module, object]:
    """``(model, processor)`` of a frozen CLIP: the CLIP score's model (callbacks/clip_score.py, through
    ``CLIPScore(model_name_or_path=lambda: ...)``) and the failure-type analysis's image features. The model's
    ``get_image_features`` / ``get_text_features`` return the projected feature tensors.

    ``model``: ``"shapesworld"`` (the world's CLIP), a local folder with a ``CLIPModel`` and its processor
    (``save_pretrained``), or a hub id such as ``openai/clip-vit-base-patch32``.
    """
    from transformers import CLIPModel, CLIPProcessor

    world = model == "shapesworld"
    source = SHAPESWORLD_DIR / "clip" if world else Path(model).expanduser()
    if world and not (source / "config.json").exists():
        raise SageError(f"ShapesWorld's CLIP is missing at {source}: rebuild it with `sage-shapesworld build`")
    name = str(source) if world or source.exists() else model
    local = local_files_only or world or source.exists()
    try:
        clip = CLIPModel.from_pretrained(name, local_files_only=local).eval().requires_grad_(False)
        if world and not (source / "preprocessor_config.json").exists():
            processor = _shapesworld_processor(source, int(clip.config.vision_config.image_size))
        else:
            processor = CLIPProcessor.from_pretrained(name, local_files_only=local)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SageError(
            f"cannot load CLIP model {model!r} ({first[:160]}): give 'shapesworld', a folder with a CLIPModel and "
            "its processor, or a hub id"
        ) from err
    return _FeatureTensors(clip), processor
