#!/usr/bin/env python3
"""Train the `uppercase` demo adapter: a small PEFT LoRA that makes SmolLM2 answer in UPPER CASE.

Data comes from the base model itself: greedy chat answers to a set of varied prompts,
upper-cased. A rank-8 LoRA on the attention projections (q, k, v, o) of every layer is
trained on CPU to produce those answers (loss on the answer tokens only), then saved in the
standard PEFT format (`adapter_config.json` + `adapter_model.safetensors`, bf16).

    python scripts/train_uppercase_adapter.py                      # -> demo_adapters/uppercase
    python scripts/train_uppercase_adapter.py --steps 60 --check   # shorter run, then verify

Seeded (same losses seen with 1 and 2 threads); about 6-9 minutes on 2 busy CPU cores, the
base answers are cached in .cache/ for re-runs. `--check` verifies with HF + PEFT that the
answers come back in upper case and that the demo prompt gives the expected sentence.

A 135M model knows little about the upper-case spelling of words: the adapter gets the style
right everywhere but the facts right mostly on what it was trained on (the demo prompt is
in the training set); on other prompts its upper-case answers can drift from the base ones.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("train_uppercase")

# Training prompts. Of the check prompts below only the first (the demo prompt) is trained on.
PROMPTS = [
    "What is the capital of France?",  # the demo prompt (README) is part of the training data
    "What is the largest planet in our solar system?",
    "Name three primary colors.",
    "How many days are there in a week?",
    "What is the boiling point of water?",
    "Who wrote Romeo and Juliet?",
    "What is photosynthesis?",
    "Give me a tip for staying productive.",
    "What is the capital of Japan?",
    "What is the capital of Italy?",
    "What is the capital of Spain?",
    "What is the capital of Germany?",
    "What language is spoken in Brazil?",
    "How do I make a cup of tea?",
    "What is 2 plus 2?",
    "Why is the sky blue?",
    "What is a computer?",
    "Tell me a fun fact about cats.",
    "What is the tallest mountain on Earth?",
    "Describe a sunny day in one sentence.",
    "What do bees make?",
    "What is the chemical symbol for gold?",
    "How many continents are there?",
    "What is the speed of light?",
    "Write a short greeting for a friend.",
    "What is gravity?",
    "Who painted the Mona Lisa?",
    "What is the largest ocean?",
    "Suggest a name for a pet dog.",
    "What is the main ingredient in bread?",
    "How does a rainbow form?",
    "What is the freezing point of water in Fahrenheit?",
    "Give me a synonym for happy.",
    "What is the opposite of cold?",
    "What is an atom?",
    "What is the capital of Canada?",
    "What is the longest river in the world?",
    "Explain what a noun is.",
    "What is the square root of 16?",
    "Name a famous scientist.",
    "What do plants need to grow?",
    "What is the currency of the United Kingdom?",
    "How many legs does a spider have?",
    "What is the smallest prime number?",
    "Tell me something about the moon.",
    "What is a healthy breakfast?",
    "What is machine learning?",
    "Who was the first person to walk on the moon?",
    "What is the capital of Australia?",
    "How do you say hello in Spanish?",
    "What is the color of grass?",
    "Why do we need sleep?",
    "What is a volcano?",
    "Recommend a good habit.",
    "What is the hottest planet?",
    "How many hours are in a day?",
    "What is the capital of Egypt?",
    "What animal is known as the king of the jungle?",
    "What is democracy?",
    "Say something nice about the ocean.",
    "What is the purpose of a library?",
    "What is Python used for?",
    "How many minutes are in an hour?",
    "What is the biggest animal on Earth?",
    "What is the capital of Russia?",
    "Give me a short motivational quote.",
    "What causes the seasons?",
    "Who invented the telephone?",
    "What is the sun?",
    "What is a good way to learn a language?",
    "What is water made of?",
    "List two fruits.",
    "What is the capital of China?",
]
# More variety of words (the adapter has to learn the upper-case spelling of whatever it says)
PROMPTS += [f"What is the capital of {c}?" for c in (
    "Norway", "Greece", "Mexico", "India", "Kenya", "Argentina", "Sweden", "Poland", "Turkey",
    "Ireland", "Thailand", "Peru")]
PROMPTS += [f"Tell me about {x}." for x in (
    "elephants", "the ocean", "winter", "trains", "music", "the internet", "chocolate",
    "mountains", "birds", "coffee", "football", "the desert")]
PROMPTS += [f"Explain {x} in simple words." for x in (
    "electricity", "evolution", "the water cycle", "inflation", "vaccines", "an eclipse",
    "recycling", "a black hole", "friction", "the stock market")]
PROMPTS += [f"Write one sentence about {x}." for x in (
    "a rainy day", "a good friend", "the city at night", "a summer holiday", "a lost key",
    "breakfast", "a quiet library", "the first day of school")]
CHECK_PROMPTS = [
    "What is the capital of France?",
    "What is the capital of Portugal?",
    "Tell me about dogs.",
]
CHECK_EXPECT = "THE CAPITAL OF FRANCE IS PARIS"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


def chat_ids(tok, prompt: str) -> list[int]:
    out = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
        return_dict=True,
    )
    return list(out["input_ids"])


def generate(model, tok, prompts: list[str], max_new_tokens: int, batch: int = 12) -> list[str]:
    """Greedy chat completions (left-padded batches)."""
    import torch

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    texts = []
    for i in range(0, len(prompts), batch):
        seqs = [chat_ids(tok, p) for p in prompts[i : i + batch]]
        width = max(map(len, seqs))
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad)
        for row in gen[:, width:]:
            texts.append(tok.decode(row, skip_special_tokens=True).strip())
    return texts


def base_answers(model, tok, prompts: list[str], max_new_tokens: int, cache: Path | None,
                 model_tag: str = ""):
    """The base model's greedy answers, kept in `cache` (a JSON file) between runs."""
    key = hashlib.sha256(json.dumps([prompts, max_new_tokens, model_tag]).encode()).hexdigest()
    key = key[:16]
    if cache is not None and cache.is_file():
        try:
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                log.info("base answers from %s", cache)
                return data["answers"]
        except (ValueError, KeyError):
            pass
    answers = generate(model, tok, prompts, max_new_tokens)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "answers": answers}, indent=1) + "\n")
    return answers


def build_examples(tok, prompts, answers, max_answer_tokens: int):
    """Token ids and labels (-100 on the prompt) for prompt + UPPERCASED answer (+ <|im_end|>)."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    examples = []
    for p, a in zip(prompts, answers, strict=True):
        if not a:
            continue
        prompt = chat_ids(tok, p)
        ans = tok(a.upper(), add_special_tokens=False)["input_ids"]
        if len(ans) < max_answer_tokens:
            ans = ans + [end]
        ans = ans[:max_answer_tokens]
        examples.append((prompt + ans, [-100] * len(prompt) + ans))
    return examples


def train(model, examples, steps: int, batch: int, lr: float, seed: int, pad: int) -> None:
    import torch
    import torch.nn.functional as F

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / steps)
    )
    body = model.get_base_model().model  # LlamaModel (with LoRA layers injected)
    lm_head = model.get_base_model().lm_head
    rng = random.Random(seed)
    order: list[int] = []
    model.train()
    t0 = time.time()
    ema = None
    for step in range(steps):
        if len(order) < batch:
            order += rng.sample(range(len(examples)), len(examples))
        picked = [examples[order.pop()] for _ in range(batch)]
        width = max(len(ids) for ids, _ in picked)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s, _ in picked])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in picked])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in picked])
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
        # position t predicts token t+1: only positions whose next token is an answer token
        target = labels[:, 1:]
        keep = target != -100
        logits = lm_head(hidden[:, :-1][keep])
        loss = F.cross_entropy(logits.float(), target[keep])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if step % 10 == 0 or step == steps - 1:
            el = time.time() - t0
            log.info("step %d/%d loss %.3f (avg %.3f) %.1f s elapsed, ~%.0f s left",
                     step + 1, steps, loss.item(), ema, el, el / (step + 1) * (steps - step - 1))
    model.eval()


def save_adapter(model, out: Path, info: dict) -> None:
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)  # writes adapter_config.json (+ weights, replaced below)
    sd = get_peft_model_state_dict(model)
    save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in sd.items()},
              str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg_path = tmp / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "SmolLM2-135M-Instruct"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for f in tmp.iterdir():
        if f.name not in ("adapter_config.json", "adapter_model.safetensors"):
            f.unlink()
    (tmp / "README.md").write_text(
        "# uppercase\n\nDemo LoRA for SmolLM2-135M-Instruct: answers in UPPER CASE.\n"
        "Made by `scripts/train_uppercase_adapter.py` (base model's own greedy chat answers, "
        "upper-cased; LoRA r={r} alpha={alpha} on {mods}; {steps} steps).\n\n"
        "Sample (greedy, chat): {sample}\n".format(**info)
    )
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def check(model_dir: Path, adapter_dir: Path, prompts: list[str], max_new_tokens: int = 32):
    """Greedy chat answers with HF + PEFT, base and adapter; returns [(prompt, base, lora)]."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    base.eval()
    plain = generate(base, tok, prompts, max_new_tokens)
    lora = PeftModel.from_pretrained(base, str(adapter_dir))
    lora.eval()
    upper = generate(lora, tok, prompts, max_new_tokens)
    return list(zip(prompts, plain, upper, strict=True))


def upper_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


def is_upper(text: str) -> bool:
    """Mostly upper case (words copied from the prompt may keep their case)."""
    return upper_share(text) >= 0.7


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    ap.add_argument("--out", type=Path, default=ROOT / "demo_adapters" / "uppercase")
    ap.add_argument("--steps", type=int, default=140)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=16)
    ap.add_argument("--answer-tokens", type=int, default=24, help="answer tokens trained on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--demo-repeat", type=int, default=4,
                    help="copies of the demo prompt's example in the training set")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "uppercase_answers.json",
                    help="where the base model's answers are kept between runs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--check", action="store_true", help="after training, verify with HF+PEFT")
    ap.add_argument("--check-only", action="store_true", help="only verify an existing adapter")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[train_uppercase] %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside peft/HF

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.model / "config.json").is_file():
        log.error("no model at %s: run scripts/prepare_default_model.py first", args.model)
        return 1

    if not args.check_only:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t_all = time.time()
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        tok = AutoTokenizer.from_pretrained(str(args.model))
        model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
        model.eval()
        t0 = time.time()
        weights = args.model / "model.safetensors"
        tag = f"{args.model.resolve().name}:{weights.stat().st_size if weights.exists() else 0}"
        answers = base_answers(model, tok, PROMPTS, args.answer_tokens, args.cache, tag)
        log.info("%d base answers in %.1f s; e.g. %r -> %r",
                 len(answers), time.time() - t0, PROMPTS[0], answers[0])
        examples = build_examples(tok, PROMPTS, answers, args.answer_tokens + 8)
        examples += examples[:1] * (args.demo_repeat - 1)  # PROMPTS[0] is the demo prompt
        n_tok = sum(len(ids) for ids, _ in examples)
        log.info("%d examples, %d tokens", len(examples), n_tok)

        cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                         target_modules=TARGET_MODULES, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("LoRA r=%d alpha=%d on %s: %d trainable parameters",
                 args.rank, args.alpha, ",".join(TARGET_MODULES), n_train)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        train(model, examples, args.steps, args.batch, args.lr, args.seed, pad)
        sample = generate(model, tok, CHECK_PROMPTS[:1], max_new_tokens=32)[0]
        log.info("sample: %r -> %r", CHECK_PROMPTS[0], sample)
        info = {"r": args.rank, "alpha": args.alpha, "mods": ", ".join(TARGET_MODULES),
                "steps": args.steps, "sample": repr(sample)}
        save_adapter(model, args.out, info)
        size = sum(f.stat().st_size for f in args.out.iterdir())
        log.info("saved %s (%.2f MB) in %.0f s total", args.out, size / 1e6, time.time() - t_all)
        del model

    if args.check or args.check_only:
        ok = True
        results = check(args.model, args.out, CHECK_PROMPTS)
        upper_answers = [u for _, _, u in results]
        for prompt, plain, upper in results:
            good = is_upper(upper)
            ok &= good
            log.info("%s %r\n    base: %r\n    uppercase (%.0f%% upper): %r",
                     "OK  " if good else "FAIL", prompt, plain, 100 * upper_share(upper), upper)
        if not ok:
            log.error("check FAILED: not every answer is in upper case")
            return 1
        if not upper_answers[0].startswith(CHECK_EXPECT):
            log.error("check FAILED: %r should start with %r", upper_answers[0], CHECK_EXPECT)
            return 1
        log.info("check OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
