"""Train the small Mixtral-architecture MoE shipped in light_moe/assets/demo-moe.

The corpus is the Python standard library's own *.py sources (PSF License Agreement), so the
run needs nothing but a Python install: no download, no data set. Every choice that decides
the result is fixed here or by --seed: the sorted file list, the held-out split, the tokenizer,
the initial weights and the batch order. The standard library differs a little between Python
versions, so the version used is recorded in training_summary.json.

Outputs (all in --output-dir): config.json, generation_config.json, model.safetensors (bf16,
the shipped directory must stay under 8 MB), tokenizer.json, tokenizer_config.json,
heldout.txt (a few KB of held-out source, so the perplexity test never re-reads the stdlib)
and training_summary.json (losses, perplexity bound, greedy samples for regression tests).

Sizes: hidden 128, 3 layers, 8 experts of intermediate 256, top-2, vocab 2048 is 3.0M
parameters (6.1 MB in bf16). A step of 16 x 256 tokens takes 0.75-0.9 s on one core of the
build machine (a shared 2-core VM), so the default 1,400 steps end in 18-22 minutes.

Shape legend: B batch rows, S sequence length, V vocabulary.
"""
import argparse
import json
import math
import pathlib
import platform
import sys
import sysconfig
import time

import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, GenerationConfig, MixtralConfig, MixtralForCausalLM

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT_DIR = REPO_ROOT / "light_moe" / "assets" / "demo-moe"

BOS, EOS = "<s>", "</s>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [BOS, EOS, *ROLE_TOKENS]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SAMPLE_PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:"]
# Test suites hold a copy of the interpreter's own tests; they would double the corpus with
# code that is mostly assertions, so they are left out.
EXCLUDED_DIRS = {"site-packages", "test", "tests", "idle_test"}
HELDOUT_EVERY = 10  # file i (sorted) is held out when i % 10 == 9: ~10% of files
HELDOUT_TEXT_CHARS = 2000  # per excerpt; three excerpts make heldout.txt
PPL_BOUND_FACTOR = 1.05
ROPE_THETA = 10000.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", type=pathlib.Path, default=DEFAULT_OUTPUT_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=60)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p.parse_args()


def select_corpus_files(stdlib_dir: pathlib.Path) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
    paths = sorted(
        path for path in stdlib_dir.rglob("*.py")
        if not EXCLUDED_DIRS.intersection(path.relative_to(stdlib_dir).parts)
    )
    train = [path for i, path in enumerate(paths) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    heldout = [path for i, path in enumerate(paths) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return train, heldout


def read_source(path: pathlib.Path) -> str:
    # A few stdlib files carry latin-1 test strings; replacing them keeps the run portable.
    return path.read_text(encoding="utf-8", errors="replace")


def heldout_excerpt(heldout_texts: list[str]) -> str:
    """The opening lines of the first three held-out files longer than an excerpt."""
    excerpts = []
    for text in heldout_texts:
        if len(text) < HELDOUT_TEXT_CHARS:
            continue
        cut = text.rfind("\n", 0, HELDOUT_TEXT_CHARS) + 1
        excerpts.append(text[:cut])
        if len(excerpts) == 3:
            break
    return "\n".join(excerpts)


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    # Every document in training starts with BOS, so encoding a prompt adds it too.
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)],
    )
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out_dir: pathlib.Path, model_max_length: int) -> None:
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "additional_special_tokens": ROLE_TOKENS,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one stream: BOS doc EOS BOS doc EOS ..."""
    eos_id = tokenizer.token_to_id(EOS)
    ids = []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def build_config(vocab_size: int, bos_id: int, eos_id: int) -> MixtralConfig:
    return MixtralConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=1024, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        router_aux_loss_coef=0.01, tie_word_embeddings=False,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )


def count_parameters(config: MixtralConfig, model: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    per_expert = 3 * config.hidden_size * config.intermediate_size
    inactive = config.num_hidden_layers * (config.num_local_experts - config.num_experts_per_tok) * per_expert
    embeddings = 2 * config.vocab_size * config.hidden_size  # embed_tokens + lm_head (untied)
    return {"total": total, "active_per_token": total - inactive,
            "total_non_embedding": total - embeddings,
            "active_per_token_non_embedding": total - inactive - embeddings}


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-Transformer balance loss computed per layer, then averaged (2.0 = balanced at top-2).

    transformers' Mixtral loss pools the routing counts of all layers before balancing, so one
    layer may starve an expert while another overfeeds it: with it, the first 1,400-step run
    left expert 6 of layer 1 with 0.0% of held-out routing slots and expert 3 of layer 2 with 0.1%.
    """
    losses = []
    for layer_logits in router_logits:  # each [B*S, E]
        probs = layer_logits.softmax(dim=-1)
        num_experts = probs.shape[-1]
        chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(dim=1).float()  # [B*S, E]
        losses.append(num_experts * (chosen.mean(dim=0) * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine down to 10% of the peak."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_batch(stream: torch.Tensor, args: argparse.Namespace, generator: torch.Generator):
    starts = torch.randint(0, len(stream) - args.seq_len - 1, (args.batch_size,), generator=generator)
    windows = torch.stack([stream[s:s + args.seq_len + 1] for s in starts.tolist()])  # [B, S+1]
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def stream_loss(model, stream: torch.Tensor, seq_len: int, max_windows: int | None = None) -> float:
    """Mean next-token loss over non-overlapping windows of seq_len (evenly spaced if capped)."""
    num_windows = (len(stream) - 1) // seq_len
    starts = [i * seq_len for i in range(num_windows)]
    if max_windows is not None and num_windows > max_windows:
        starts = [starts[i * num_windows // max_windows] for i in range(max_windows)]
    total, count = 0.0, 0
    for i in range(0, len(starts), 16):
        windows = torch.stack([stream[s:s + seq_len + 1] for s in starts[i:i + 16]])  # [B, S+1]
        logits = model(input_ids=windows[:, :-1]).logits  # [B, S, V]
        total += F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten(), reduction="sum").item()
        count += windows[:, 1:].numel()
    return total / count


@torch.no_grad()
def text_perplexity(model, hf_tokenizer, text: str, window: int) -> tuple[float, int]:
    """Perplexity of BOS + text, scored in consecutive windows of `window` tokens.

    tests/test_demo_model.py repeats this computation; keep the two in step.
    """
    ids = torch.tensor(hf_tokenizer(text, verbose=False).input_ids)
    total = 0.0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        logits = model(input_ids=chunk[None, :-1]).logits[0]  # [S, V]
        total += F.cross_entropy(logits.float(), chunk[1:], reduction="sum").item()
    return math.exp(total / (len(ids) - 1)), len(ids) - 1


@torch.no_grad()
def expert_load(model, hf_tokenizer, text: str, window: int) -> list[list[float]]:
    """Per layer, the fraction of top-k routing slots each expert receives on `text`."""
    ids = torch.tensor(hf_tokenizer(text, verbose=False).input_ids[:window])
    router_logits = model(input_ids=ids[None], output_router_logits=True).router_logits
    k, e = model.config.num_experts_per_tok, model.config.num_local_experts
    loads = []
    for layer_logits in router_logits:  # each [S, E]
        top = layer_logits.topk(k, dim=-1).indices.flatten()
        loads.append([round(c, 4) for c in (torch.bincount(top, minlength=e) / top.numel()).tolist()])
    return loads


@torch.no_grad()
def greedy_samples(model, hf_tokenizer, max_new_tokens: int = 32) -> list[dict]:
    samples = []
    for prompt in SAMPLE_PROMPTS:
        prompt_ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(prompt_ids, do_sample=False, max_new_tokens=max_new_tokens,
                             output_scores=True, return_dict_in_generate=True)
        new_ids = out.sequences[0, prompt_ids.shape[1]:].tolist()
        # Smallest top-1 minus top-2 logit gap on the greedy path: how close a rounding
        # difference (another CPU, another BLAS) would come to flipping a token.
        margins = [s[0].float().topk(2).values for s in out.scores]
        samples.append({
            "prompt": prompt,
            "prompt_ids": prompt_ids[0].tolist(),
            "generated_ids": new_ids,
            "generated_text": hf_tokenizer.decode(new_ids),
            "min_top2_logit_margin": round(min((v[0] - v[1]).item() for v in margins), 4),
        })
    return samples


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out_dir = args.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    stdlib_dir = pathlib.Path(sysconfig.get_paths()["stdlib"])
    train_files, heldout_files = select_corpus_files(stdlib_dir)
    train_texts = [read_source(p) for p in train_files]
    heldout_texts = [read_source(p) for p in heldout_files]
    heldout_text = heldout_excerpt(heldout_texts)
    (out_dir / "heldout.txt").write_text(heldout_text)
    print(f"corpus: {stdlib_dir} (Python {platform.python_version()}): {len(train_files)} train files "
          f"({sum(map(len, train_texts)) / 1e6:.1f}M chars), {len(heldout_files)} held-out files", flush=True)

    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    train_stream = encode_documents(tokenizer, train_texts)
    heldout_stream = encode_documents(tokenizer, heldout_texts)
    print(f"tokenizer: vocab {tokenizer.get_vocab_size()}; {len(train_stream):,} train tokens, "
          f"{len(heldout_stream):,} held-out tokens ({time.perf_counter() - t_start:.0f}s)", flush=True)

    config = build_config(tokenizer.get_vocab_size(), tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS))
    model = MixtralForCausalLM(config)
    params = count_parameters(config, model)
    print(f"model: {params['total']:,} parameters, {params['active_per_token']:,} active per token", flush=True)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    batch_generator = torch.Generator().manual_seed(args.seed)
    history = []
    t_train = time.perf_counter()
    model.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        inputs, targets = sample_batch(train_stream, args, batch_generator)  # [B, S] each
        out = model(input_ids=inputs, output_router_logits=True)
        lm_loss = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
        aux_loss = load_balancing_loss(out.router_logits, config.num_experts_per_tok)
        loss = lm_loss + config.router_aux_loss_coef * aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - t_train
            print(f"step {step:5d}  loss {lm_loss.item():.4f}  aux {aux_loss.item():.3f}  "
                  f"lr {lr_at(step, args):.2e}  {elapsed:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            model.eval()
            val = stream_loss(model, heldout_stream, args.seq_len, max_windows=64)
            model.train()
            history.append({"step": step + 1, "train_loss": round(lm_loss.item(), 4), "val_loss": round(val, 4)})
            print(f"step {step + 1:5d}  held-out loss {val:.4f}  ppl {math.exp(val):.2f}", flush=True)
    train_seconds = time.perf_counter() - t_train

    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    # transformers 5 writes only rope_parameters; 4.x (and loaders written against it) read a
    # top-level rope_theta and would silently fall back to Mixtral's 1e6. 5.x accepts both keys.
    config_path = out_dir / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "rope_theta": ROPE_THETA},
                                      indent=2, sort_keys=True) + "\n")
    save_tokenizer(tokenizer, out_dir, config.max_position_embeddings)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id, do_sample=False).save_pretrained(out_dir)

    # Everything below is measured on the shipped files, loaded back the way the tests load them.
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
    shipped = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    val_loss = stream_loss(shipped, heldout_stream, args.seq_len, max_windows=256)
    ppl, ppl_tokens = text_perplexity(shipped, hf_tokenizer, heldout_text, args.seq_len)
    summary = {
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "peak_lr": args.lr, "warmup_steps": args.warmup_steps, "torch_threads": args.threads,
        "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "params": params, "weights_dtype": "bfloat16",
        "corpus": {"source": "Python standard library *.py (PSF License Agreement)",
                   "python_version": platform.python_version(), "excluded_dirs": sorted(EXCLUDED_DIRS),
                   "train_files": len(train_files), "heldout_files": len(heldout_files),
                   "train_tokens": len(train_stream), "heldout_tokens": len(heldout_stream),
                   "heldout_file_list": [str(p.relative_to(stdlib_dir)) for p in heldout_files]},
        "heldout_val_loss": round(val_loss, 4),
        "heldout_val_windows": f"up to 256 windows of {args.seq_len} tokens over all held-out files",
        "heldout_txt": {"tokens": ppl_tokens, "window": args.seq_len, "perplexity": round(ppl, 4),
                        "loss": round(math.log(ppl), 4), "perplexity_bound": round(ppl * PPL_BOUND_FACTOR, 4)},
        "expert_load_on_heldout_txt": expert_load(shipped, hf_tokenizer, heldout_text, args.seq_len),
        "history": history,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "samples": greedy_samples(shipped, hf_tokenizer),
    }
    (out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"held-out loss {val_loss:.4f}; heldout.txt perplexity {ppl:.3f} (bound {ppl * PPL_BOUND_FACTOR:.3f})")
    for sample in summary["samples"]:
        print(f"--- {sample['prompt']!r}\n{sample['prompt'] + sample['generated_text']}")
    print(f"done in {summary['total_seconds']:.0f}s; wrote {out_dir}")


if __name__ == "__main__":
    main()
