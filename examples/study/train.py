"""Train a tiny GPT-NeoX on a text, on the CPU, saving checkpoints in Pythia's layout (step{N}/).

The paper in miniature (`make study`): the same model and data at a tuned learning rate and at ten times
that, so that ckptavg's LAWA, EMA and SWA can be compared on both trajectories.

    python examples/study/train.py --text examples/study/genesis-kjv.txt --lr 3e-3 --out study/lr3e-3

It also makes the run that ships in examples/tiny-run (`make example-data`): 10000 steps at lr 3e-2, a
checkpoint every 1000, saved as Pythia's own step files are (`--format bin`: an fp16 pytorch_model.bin
written by torch.save).

Characters are tokens (a WordLevel tokenizer over the text's characters, saved with every checkpoint).
The last 10% of the text is held out and written to OUT/../heldout.txt; it is never trained on.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging


def read_text(path: Path) -> str:
    return "".join(ln for ln in path.read_text().splitlines(keepends=True) if not ln.startswith("#"))


def char_tokenizer(text: str) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(sorted(set(text)))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>")


def save_pythia_bin(model: GPTNeoXForCausalLM, folder: Path) -> None:
    """A step folder as Pythia's are on the Hub: config.json and an fp16 pytorch_model.bin by torch.save.

    Pythia's files name the head embed_out.weight (transformers 5 says lm_head.weight in memory) and carry,
    per layer, the legacy attention buffers: a bool causal mask, masked_bias (-1e9 in fp16: -inf) and
    the rotary inv_freq.
    """
    config = model.config
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        ("embed_out.weight" if k == "lm_head.weight" else k): v.detach().to(torch.float16).clone()
        for k, v in model.state_dict().items()
    }
    n, rot = config.max_position_embeddings, int(config.hidden_size // config.num_attention_heads * 0.25)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    for i in range(config.num_hidden_layers):
        p = f"gpt_neox.layers.{i}.attention."
        state[p + "bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
        state[p + "masked_bias"] = torch.tensor(-1e9).half()
        state[p + "rotary_emb.inv_freq"] = inv_freq.half()
    dtype = config.dtype
    config.dtype = "float16"
    config.save_pretrained(folder)
    config.dtype = dtype
    torch.save(state, folder / "pytorch_model.bin")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="run folder; checkpoints go to OUT/step{N}")
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--format",
        choices=["safetensors", "bin"],
        default="safetensors",
        help="safetensors: save_pretrained (fp32); bin: Pythia's fp16 pytorch_model.bin by torch.save",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch (0: torch's default); 1 makes the result independent of the core count",
    )
    args = ap.parse_args()

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    text = read_text(args.text)
    cut = int(len(text) * 0.9)
    tokenizer = char_tokenizer(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out.parent / "heldout.txt").write_text(text[cut:])
    ids = torch.tensor(tokenizer(text[:cut], add_special_tokens=False)["input_ids"])

    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=args.seq_len, rotary_pct=0.25, bos_token_id=0,
        eos_token_id=0, dtype="float32",
    )
    model = GPTNeoXForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    # Linear warmup, then constant: the high-learning-rate regime the paper studies, with no decay to
    # do the averaging's work.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, ids.numel() - args.seq_len, (args.batch,), generator=g)
        batch = torch.stack([ids[s : s + args.seq_len] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if not math.isfinite(loss.item()):
            raise SystemExit(f"lr {args.lr}: loss diverged at step {step}")
        if step % args.save_every == 0:
            folder = args.out / f"step{step}"
            if args.format == "bin":
                save_pythia_bin(model, folder)
            else:
                model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        if step % 250 == 0:
            print(f"lr {args.lr:g} step {step} train loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
