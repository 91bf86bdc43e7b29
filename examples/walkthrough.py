"""ossgpt from text to text, in data-flow order: the pieces `ossgpt train` and `ossgpt generate` put together.

    python examples/walkthrough.py                        # the shared novels, the tiny preset, 40 steps
    python examples/walkthrough.py --text my.txt --steps 200 --out runs/walkthrough

text -> tokens -> batches -> model -> loss -> optimizer step -> checkpoint -> generate. Each step calls the
package's public pieces with keyword arguments; read it top to bottom. A few minutes of CPU buy a model that
writes word-like text; `ossgpt train` adds what a real run needs on top (evaluation, logs, resumable checkpoints,
several processes).
"""

import argparse
import math
from pathlib import Path

import torch

from ossgpt import GPTOSSConfig, GPTOSSForCausalLM
from ossgpt.data.prepare import prepare
from ossgpt.tokenizer import load_tokenizer
from ossgpt.training.data import TrainBatches, open_split, validation_batches
from ossgpt.training.optim import build_optimizer, lr_at, set_lr

SHARED_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--text", type=Path, default=SHARED_TEXT, help="a text file to learn from (default: %(default)s)")
parser.add_argument("--out", type=Path, default=Path("runs/walkthrough"), help="folder for the data and the model")
parser.add_argument("--tokenizer", default=None, help="a tokenizer spec (default: the tiny preset's)")
parser.add_argument("--steps", type=int, default=40, help="optimizer steps")
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--seq-len", type=int, default=256)
args = parser.parse_args()
if not args.text.is_file():
    parser.error(f"no text file at {args.text}; pass --text FILE")
torch.manual_seed(0)

# --- 1. text -> tokens -----------------------------------------------------------------------------------------------
# The tiny preset (ossgpt.presets) holds a model, its tokenizer and its training recipe. Its tokenizer is a compact
# one: the 8,192 most frequent cl100k tokens of *this* text, plus the 256 bytes, so any text stays encodable.
# `prepare` fits it, tokenizes the text (95% train, the last 5% validation) and writes token files.
preset = GPTOSSConfig.from_preset("tiny")
data_dir = args.out / "data"
meta = prepare([args.text], data_dir, tokenizer=args.tokenizer or preset.tokenizer, force=True)
tokenizer = load_tokenizer(meta["tokenizer"], directory=data_dir)
example = tokenizer.encode("To be, or not to be")
print(f"1. {meta['train_tokens']:,} training tokens; 'To be, or not to be' -> {example}")

# --- 2. tokens -> batches --------------------------------------------------------------------------------------------
# A batch is batch_size windows of seq_len tokens. The model is trained to predict each next token, so the labels
# are the inputs themselves: the model shifts them by one inside. Windows come in shuffled epochs: the batch of
# step s is a function of (seed, s), which is what lets a run resume exactly.
train_tokens = open_split(data_dir, "train", seq_len=args.seq_len)  # a memory-mapped uint32 array
batches = TrainBatches(train_tokens, batch_size=args.batch_size, seq_len=args.seq_len, seed=0)
input_ids = batches.batch(step=0, micro_step=0)
print(f"2. a batch: {tuple(input_ids.shape)} token ids; row 0 starts {tokenizer.decode(input_ids[0, :12])!r}")

# --- 3. the model ----------------------------------------------------------------------------------------------------
# GPT-OSS: embeddings, then blocks of attention (with sinks, alternating sliding-window and full) and a mixture of
# experts, then the LM head (ossgpt/model/). The vocabulary follows the tokenizer: the preset's, or the data's.
config = preset
if meta["tokenizer"] != preset.tokenizer:  # --tokenizer: the preset's shape on the data's vocabulary
    config = preset.replace(tokenizer=meta["tokenizer"], vocab_size=meta["vocab_size"],
                            eos_token_id=meta["eot_token_id"])  # fmt: skip
model = GPTOSSForCausalLM(config)
print(f"3. {model.num_parameters():,} parameters: {config.num_hidden_layers} layers, {config.num_local_experts} "
      f"experts of which {config.num_experts_per_tok} run per token")  # fmt: skip

# --- 4. the loss -----------------------------------------------------------------------------------------------------
# Next-token cross-entropy (nats per token) plus the routers' load-balancing and z losses. An untrained model
# guesses uniformly: its loss is about ln(vocabulary).
out = model(input_ids, labels=input_ids)
print(f"4. loss at initialisation {out.lm_loss.item():.3f} (ln of the vocabulary: {math.log(config.vocab_size):.3f})")

# --- 5. optimizer steps ----------------------------------------------------------------------------------------------
# Muon for the attention and expert matrices, AdamW for the rest; linear warm-up, then a cosine decay.
# `return_logits=False` lets the model compute the loss chunk by chunk, never holding all the logits.
optimizer = build_optimizer(model, learning_rate=6e-3, weight_decay=0.3, betas=(0.9, 0.95), name="muon")
model.train()
for step in range(args.steps):
    set_lr(optimizer, lr_at(step, learning_rate=6e-3, min_lr=6e-4, warmup_steps=min(20, args.steps // 4),
                            max_steps=args.steps))  # fmt: skip
    input_ids = batches.batch(step=step, micro_step=0)
    loss = model(input_ids, labels=input_ids, return_logits=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if step % 10 == 0 or step == args.steps - 1:
        print(f"5. step {step + 1}/{args.steps}: loss {loss.item():.3f}")

# Held-out text: the validation windows, never trained on.
model.eval()
val_tokens = open_split(data_dir, "val", seq_len=args.seq_len)
with torch.no_grad():
    val = [model(ids, labels=ids).lm_loss.item() for ids in validation_batches(val_tokens, 4, args.seq_len, 4)]
print(f"   validation loss {sum(val) / len(val):.3f}")

# --- 6. checkpoint ---------------------------------------------------------------------------------------------------
# config.json + model.safetensors (no pickle), written atomically; with the tokenizer beside them, the folder is a
# model directory that every ossgpt command reads (`ossgpt generate --checkpoint DIR`).
model_dir = args.out / "model"
model.save_pretrained(model_dir)
tokenizer.save(model_dir)
model = GPTOSSForCausalLM.from_pretrained(model_dir)
print(f"6. saved and reloaded {model_dir}")

# --- 7. generate -----------------------------------------------------------------------------------------------------
# One forward pass over the prompt fills the KV cache; then one token at a time, each sampled from the next-token
# distribution (temperature, top-k) and fed back. The prompt starts after <|endoftext|>, as documents do in training.
prompt = [tokenizer.eot_token_id, *tokenizer.encode("ROMEO:")]
output = model.generate(torch.tensor([prompt]), max_new_tokens=60, do_sample=True, temperature=0.8, top_k=50,
                        seed=0, eos_token_id=tokenizer.eot_token_id)  # fmt: skip
print("7. " + tokenizer.decode(output[0, 1:]))
