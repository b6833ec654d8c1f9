"""ShapesWorld's models: architectures, the shipped folder layout, export (fp16 safetensors) and manifest.

Shipped layout under ``weights/`` (package data):
- ``clip/``: the tiny ``CLIPModel`` (text tower on the real CLIP tokenizer) and the tokenizer files.
- ``pipeline/``: a diffusers ``StableDiffusionPipeline`` folder (``vae/`` is written by the VAE stage;
  ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` and ``model_index.json`` by the UNet stage).
- ``world.json``: recommended sampling defaults, gate figures and training step counts per stage.
- ``MANIFEST.json``: sha256 and size of every shipped file.

Float tensors are stored as float16 to keep the package small; configs keep float32, so loaders that do
not ask for a dtype get float32 models.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPTextModel

from sage_lightning.models import clip_tokenizer, write_clip_bpe_files
from sage_lightning.shapesworld.shipped import SHAPESWORLD_DIR

WEIGHTS = Path(os.environ.get("SHAPESWORLD_WEIGHTS", SHAPESWORLD_DIR))  # override: tests / experiments
# full training state (checkpoints, latent pools, logs): a cache outside the repository, kept across sessions
WORK = Path(os.environ.get("SHAPESWORLD_WORK", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                           / "sage-lightning" / "shapesworld"))
CLIP_DIR = WEIGHTS / "clip"
PIPELINE_DIR = WEIGHTS / "pipeline"
WORLD_JSON = WEIGHTS / "world.json"
MANIFEST = WEIGHTS / "MANIFEST.json"

TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
    max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    hidden_act="quick_gelu",
)
VISION_CONFIG = dict(
    hidden_size=96, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, image_size=64,
    patch_size=8, hidden_act="quick_gelu",
)
SCHEDULER_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
)
DEFAULTS = {"num_inference_steps": 20, "guidance_scale": 3.0, "scheduler": "ddim", "height": 64, "width": 64}


# --------------------------------------------------------------------------------------- builders
def build_clip(seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig(text_config=TEXT_CONFIG, vision_config=VISION_CONFIG, projection_dim=64))


def build_vae(seed: int = 0) -> AutoencoderKL:
    """64x64x3 -> 16x16x4 (three blocks, two downsamplings)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, norm_num_groups=16,
        block_out_channels=(16, 32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )


UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_CONFIG["hidden_size"], attention_head_dim=8, norm_num_groups=32,
)


def build_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**UNET_CONFIG, **overrides})


def ddim_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULER_CONFIG, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def ddpm_scheduler() -> DDPMScheduler:
    """The training noise schedule; its alphas equal ``ddim_scheduler()``'s."""
    return DDPMScheduler(**SCHEDULER_CONFIG, clip_sample=False)


def text_tower(clip: CLIPModel) -> CLIPTextModel:
    """The CLIP text tower as a standalone ``CLIPTextModel`` (the diffusion model's text encoder)."""
    te = CLIPTextModel(clip.config.text_config)
    prefix = "text_model."
    state = {k[len(prefix):]: v for k, v in clip.state_dict().items() if k.startswith(prefix)}
    te.load_state_dict(state)
    return te.eval()


def pixel_values(images: torch.Tensor) -> torch.Tensor:
    """CLIP/VAE input convention of this world: [N,3,64,64] in [0,1] -> [-1,1] (no processor)."""
    return images * 2.0 - 1.0


# ----------------------------------------------------------------------------------------- export
def _slim_tokenizer(folder: Path) -> None:
    """Ship the CLIP BPE as vocab.json + merges.txt (1.5 MB) instead of tokenizer.json (3.6 MB)."""
    for tok in folder.rglob("tokenizer.json"):
        write_clip_bpe_files(tok.parent)
        tok.unlink()


def _to_fp16_files(folder: Path) -> None:
    for f in folder.rglob("*.safetensors"):
        tensors = load_file(str(f))
        tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
        save_file(tensors, str(f), metadata={"format": "pt"})
    for f in folder.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)


def replace_dir(target: Path, write) -> None:
    """Write a folder with ``write(tmp)``, convert its weights to fp16 and swap it in atomically."""
    with weights_lock():
        _replace_dir(target, write)


def _replace_dir(target: Path, write) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    old = target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    _slim_tokenizer(tmp)
    _to_fp16_files(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _cpu(model):
    """A CPU float32 copy for saving (training may run on a GPU)."""
    import copy

    return copy.deepcopy(model).to("cpu", torch.float32)


def export_clip(clip: CLIPModel) -> None:
    clip = _cpu(clip)

    def write(tmp: Path) -> None:
        clip.save_pretrained(tmp, safe_serialization=True)
        clip_tokenizer().save_pretrained(tmp)

    replace_dir(CLIP_DIR, write)


def export_vae(vae: AutoencoderKL) -> None:
    vae = _cpu(vae)
    replace_dir(PIPELINE_DIR / "vae", lambda tmp: vae.save_pretrained(tmp, safe_serialization=True))


def export_pipeline(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel) -> None:
    from diffusers import StableDiffusionPipeline

    unet, vae, text_encoder = _cpu(unet), _cpu(vae), _cpu(text_encoder)

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=ddim_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    replace_dir(PIPELINE_DIR, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))


def load_clip() -> CLIPModel:
    return CLIPModel.from_pretrained(str(CLIP_DIR), local_files_only=True, dtype=torch.float32).eval()


def load_vae() -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(str(PIPELINE_DIR / "vae"), torch_dtype=torch.float32).eval()


def load_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(str(PIPELINE_DIR / "unet"), torch_dtype=torch.float32)


# --------------------------------------------------------------------------------- world.json, manifest
def read_world() -> dict:
    if WORLD_JSON.exists():
        return json.loads(WORLD_JSON.read_text())
    return {"defaults": DEFAULTS, "stages": {}}


@contextmanager
def weights_lock():
    """Serialise writers of the shipped folder (the training stages may run as separate processes)."""
    WORK.mkdir(parents=True, exist_ok=True)
    with open(WORK / ".weights.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def update_world(stage: str, **fields) -> dict:
    with weights_lock():
        return _update_world(stage, **fields)


def _update_world(stage: str, **fields) -> dict:
    world = read_world()
    world["defaults"] = {**DEFAULTS, **world.get("defaults", {})}
    entry = world.setdefault("stages", {}).setdefault(stage, {})
    entry.update(fields)
    entry["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    tmp = WORLD_JSON.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(world, indent=2, sort_keys=True) + "\n")
    tmp.replace(WORLD_JSON)
    write_manifest()
    return world


def state_sha256(module: torch.nn.Module) -> str:
    """Checksum of a module's float16-rounded weights, independent of the parameter-name prefix."""
    h = hashlib.sha256()
    for v in module.state_dict().values():
        h.update(v.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shipped_files(root: Path = WEIGHTS) -> list[Path]:
    """Every shipped file under ``weights/`` (all models' folders), without the manifest and temporaries."""
    if not root.is_dir():
        return []
    skip = {"MANIFEST.json", "MANIFEST.json.tmp", "world.json.tmp"}
    return sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.name not in skip and "__pycache__" not in p.parts
        and not any(part.endswith((".tmp", ".old")) for part in p.relative_to(root).parts)
    )


def write_manifest(root: Path = WEIGHTS) -> dict:
    entries = {str(p.relative_to(root)): {"sha256": _sha256(p), "bytes": p.stat().st_size}
               for p in shipped_files(root)}
    manifest = {"files": entries, "total_bytes": sum(e["bytes"] for e in entries.values())}
    tmp = root / "MANIFEST.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(root / "MANIFEST.json")
    return manifest


def check_manifest(root: Path = WEIGHTS) -> list[str]:
    """Differences between ``MANIFEST.json`` and the files on disk (empty when they match)."""
    manifest = json.loads((root / "MANIFEST.json").read_text())["files"]
    on_disk = {str(p.relative_to(root)): p for p in shipped_files(root)}
    problems = [f"missing: {k}" for k in manifest if k not in on_disk]
    problems += [f"not in manifest: {k}" for k in on_disk if k not in manifest]
    problems += [f"checksum differs: {k}" for k, p in on_disk.items()
                 if k in manifest and _sha256(p) != manifest[k]["sha256"]]
    return problems
