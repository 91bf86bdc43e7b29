"""What decoding in int8 costs a trained model: each `--quantize` mode's next-token predictions against float32's.

    python bench/quantize_accuracy.py --checkpoint runs/demo ../shared/data/novels/sherlock.txt

Loads the checkpoint once as stored (float32, `--quantize none`), makes its int8 copies (ossgpt.quant.int8:
weight-only, and W8A8, the CPU default), and runs each over the same windows of the text (the first `--windows`
windows of `--seq-len` tokens). Prints, per mode, on the CPU:

  bits/byte       the windows' cross-entropy in bits per UTF-8 byte of the tokens they predict
  KL              mean KL(float32 || mode) of the next-token distributions, in nats
  same argmax     the share of positions where the mode's most likely next token is float32's (what greedy picks)
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ossgpt.cli.eval import read_document
from ossgpt.errors import UserError
from ossgpt.inference.loading import load_model_and_tokenizer, quantize


@torch.no_grad()
def logits_of(model, windows: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """windows [N, T] -> float32 logits [N, T, V]."""
    return torch.cat([model(windows[i : i + batch]).logits.float() for i in range(0, len(windows), batch)])


def main(argv: list[str] | None = None) -> None:
    try:
        run(argv)
    except UserError as error:  # a missing or empty text, a checkpoint that cannot load: one line, exit 2
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def run(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a model or training run directory")
    parser.add_argument("files", nargs="+", type=Path, help="text to predict")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=64)
    args = parser.parse_args(argv)

    model, tokenizer = load_model_and_tokenizer(args.checkpoint, device="cpu", quantization="none")
    ids = torch.tensor(tokenizer.encode("\n\n".join(read_document(path) for path in args.files)))
    T = args.seq_len
    n = min(args.windows, (len(ids) - 1) // T)
    if n < 1:
        raise UserError(f"the text has {len(ids)} tokens, fewer than one window of {T} + 1; pass more text or a "
                        "smaller --seq-len")  # fmt: skip
    inputs, targets = ids[: n * T].view(n, T), ids[1 : n * T + 1].view(n, T)
    text_bytes = len(tokenizer.decode(targets.flatten().tolist()).encode())
    reference = logits_of(model, inputs).log_softmax(-1)

    print(f"{args.checkpoint}: {n} windows of {T} tokens ({n * T:,} predictions, {text_bytes:,} bytes)\n")
    print("| --quantize | bits/byte | KL from float32 (nats) | same argmax as float32 |")
    print("| --- | ---: | ---: | ---: |")
    for mode in ("none", "int8", "int8-dynamic"):
        log_probs = reference if mode == "none" else logits_of(quantize(model, mode), inputs).log_softmax(-1)
        nll = F.nll_loss(log_probs.flatten(0, 1), targets.flatten(), reduction="sum").item()
        kl = F.kl_div(log_probs, reference, log_target=True, reduction="none").sum(-1).mean().item()
        same = (log_probs.argmax(-1) == reference.argmax(-1)).float().mean().item()
        print(f"| {mode} | {nll / math.log(2) / text_bytes:.4f} | {kl:.5f} | {100 * same:.1f}% |")


if __name__ == "__main__":
    main()
