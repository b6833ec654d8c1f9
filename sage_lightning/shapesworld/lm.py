"""ShapesWorld's language model: a tiny GPT-2 on the real CLIP tokenizer, trained on the caption grammar.

It is the candidate-word source of prompt search in this world (SAGE's "language model proposes natural
next words"), loaded like any Hugging Face causal LM: ``GPT2LMHeadModel.from_pretrained(weights/lm)``
with the CLIP tokenizer saved beside it (``AutoTokenizer.from_pretrained(weights/lm)``).

Sequences are ``<|startoftext|> caption <|endoftext|>`` (ids 49406 ... 49407); the input and output
embeddings are tied. Shipped in float16 (``weights/lm/``).

Rebuild: ``python -m sage_lightning.shapesworld.lm train``; evaluate: ``... lm eval``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from sage_lightning.models import clip_tokenizer
from sage_lightning.shapesworld.generator import caption, sample_scene
from sage_lightning.shapesworld.shipped import SHAPESWORLD_DIR

LM_DIR = SHAPESWORLD_DIR / "lm"
BOS, EOS = 49406, 49407
MAX_LEN = 32
LM_CONFIG = dict(
    vocab_size=49408, n_positions=MAX_LEN, n_embd=32, n_layer=2, n_head=2, n_inner=128,
    bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS, tie_word_embeddings=True,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
)


def build_lm(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**LM_CONFIG))


def load_lm(folder: str | Path | None = None) -> GPT2LMHeadModel:
    """The shipped LM, float32, eval mode (offline)."""
    return GPT2LMHeadModel.from_pretrained(str(folder or LM_DIR), local_files_only=True,
                                           dtype=torch.float32).eval()


def captions(n: int, seed: int) -> list[str]:
    """``n`` captions of the world's grammar (scenes sampled, nothing rendered)."""
    rng = np.random.default_rng(seed)
    return [caption(sample_scene(rng), rng) for _ in range(n)]


def encode(texts: list[str], tokenizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [N, T], mask [N, T])``: BOS + caption + EOS, padded with EOS (mask 0 on padding)."""
    tok = tokenizer or clip_tokenizer()
    rows = [[BOS, *tok(t, add_special_tokens=False).input_ids[: MAX_LEN - 2], EOS] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), EOS, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def token_nll(model: GPT2LMHeadModel, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over real tokens (EOS included), computing logits only where needed."""
    hidden = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    target = ids[:, 1:]
    valid = mask[:, 1:].bool()
    logits = model.lm_head(hidden[valid])
    return F.cross_entropy(logits, target[valid], reduction="sum"), int(valid.sum())


@torch.no_grad()
def perplexity(model: GPT2LMHeadModel, texts: list[str], batch: int = 256) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(texts), batch):
        ids, mask = encode(texts[i : i + batch])
        nll, n = token_nll(model, ids, mask)
        total, count = total + float(nll), count + n
    return math.exp(total / max(count, 1))


@torch.no_grad()
def next_words(model: GPT2LMHeadModel, prompt: str, k: int = 10, tokenizer=None, max_tokens: int = 4) -> list[
        tuple[str, float]]:
    """Top-``k`` whole next words after ``prompt`` with their probabilities.

    Each of the top first tokens is completed greedily until a token that ends a word (``</w>``), so a
    multi-token word such as ``hexagon`` (``hex`` + ``agon</w>``) comes back whole. End of text is
    returned as ``"<|endoftext|>"``.
    """
    tok = tokenizer or clip_tokenizer()
    model.eval()
    base = [BOS, *tok(prompt, add_special_tokens=False).input_ids]
    probs = model(torch.tensor([base])).logits[0, -1].softmax(-1)
    top = probs.topk(k)
    out = []
    for p, t in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        seq = [t]
        while not (seq[-1] == EOS or tok.convert_ids_to_tokens(seq[-1]).endswith("</w>")) and len(seq) < max_tokens:
            seq.append(int(model(torch.tensor([base + seq])).logits[0, -1].argmax()))
        word = "<|endoftext|>" if seq[0] == EOS else tok.decode(seq, skip_special_tokens=True).strip()
        out.append((word, p))
    return out


@torch.no_grad()
def complete(model: GPT2LMHeadModel, prompt: str, tokenizer=None, sample: bool = False, top_k: int = 5,
             seed: int = 0) -> str:
    """Greedy (or top-k sampled) continuation of ``prompt`` up to end of text."""
    tok = tokenizer or clip_tokenizer()
    ids = torch.tensor([[BOS, *tok(prompt, add_special_tokens=False).input_ids]])
    gen = torch.Generator().manual_seed(seed)
    while ids.shape[1] < MAX_LEN:
        logits = model(ids).logits[0, -1]
        if sample:
            v, i = logits.topk(top_k)
            nxt = i[torch.multinomial(v.softmax(-1), 1, generator=gen)]
        else:
            nxt = logits.argmax().view(1)
        if int(nxt) == EOS:
            break
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
    return tok.decode(ids[0, 1:].tolist(), skip_special_tokens=True).strip()


class LMModule(L.LightningModule):
    def __init__(self, steps: int, lr: float = 1e-2, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_lm(seed)

    def training_step(self, batch, _):
        ids, mask = batch
        width = int(mask.sum(1).max())
        nll, n = token_nll(self.model, ids[:, :width], mask[:, :width])
        loss = nll / n
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.hparams.lr, total_steps=self.hparams.steps,
                                                    pct_start=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def train(steps: int = 500, batch_size: int = 32, n_train: int = 20000, seed: int = 0, export: bool = True) -> dict:
    torch.set_num_threads(1)
    L.seed_everything(seed, workers=True)
    t0 = time.time()
    ids, mask = encode(captions(n_train, seed=2000 + seed))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, mask), batch_size=batch_size,
                                         shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    module = LMModule(steps=steps, seed=seed)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    model = module.model.eval()
    held_out = captions(2000, seed=777_000 + seed)
    ppl = perplexity(model, held_out)
    record = {"steps": steps, "batch_size": batch_size, "n_train_captions": n_train, "seed": seed,
              "held_out_perplexity": ppl, "params": sum(p.numel() for p in model.parameters()),
              "train_seconds": round(time.time() - t0, 1)}
    print(f"[lm] held-out caption perplexity {ppl:.3f}; {record['params']} params; {record['train_seconds']} s",
          flush=True)
    if export:
        export_lm(model, record)
    return record


def export_lm(model: GPT2LMHeadModel, record: dict) -> None:
    """Write ``weights/lm/`` (save_pretrained, fp16 safetensors, tokenizer) and update world.json/manifest."""
    from sage_lightning.shapesworld import world

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        clip_tokenizer().save_pretrained(tmp)

    world.replace_dir(LM_DIR, write)
    world.update_world("lm", held_out_perplexity=record["held_out_perplexity"], params=record["params"],
                       steps=record["steps"], seed=record["seed"])


def show(model: GPT2LMHeadModel) -> None:
    for prompt in ("a photo of a red star", "a photo of a", "a painting of a small", "a blue ring on a"):
        words = ", ".join(f"{w} {p:.2f}" for w, p in next_words(model, prompt, k=6))
        print(f"{prompt!r} -> greedy: {complete(model, prompt)!r}; next words: {words}")
    for s in range(3):
        print("  sampled:", complete(model, "a photo of a red star", sample=True, seed=s))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--steps", type=int, default=500)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-export", action="store_true")
    sub.add_parser("eval")
    args = parser.parse_args(argv)
    if args.cmd == "train":
        train(steps=args.steps, seed=args.seed, export=not args.no_export)
        model = load_lm() if not args.no_export else None
    else:
        model = load_lm()
        print(f"held-out caption perplexity {perplexity(model, captions(2000, seed=777_000)):.3f}")
    if model is not None:
        show(model)


if __name__ == "__main__":
    main()
