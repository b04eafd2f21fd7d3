"""``recyclegpt-recipe``: the whole frozen-base recipe in one command, inside a time budget.

    recyclegpt-recipe --config configs/smollm2.yaml --minutes 30 [-- extra recyclegpt-train fit args]

1. fetch/load the base (``model.pretrained``) and say which CPU class and precisions it runs;
2. calibrate: time one base forward and two unrolled module steps;
3. self-generate (``selfgen_share`` of the budget, 0 = off): the base continues prompts sliced from
   the training text, and the module trains on what the base wrote (see :mod:`recyclegpt.train.selfgen`),
   with the weights ``--selfgen-quantize`` names (``auto``: w8a8 where the int8-activation kernels
   run, 1.2-1.9x the tokens/s; the module then trains on the states of the w8a8 base, which decoding reads);
   with it off, the corpus is sized so that its feature cache takes ~``cache_share`` of the budget;
4. ``recyclegpt-train fit``: features cached once, then the module trains over them for as many steps
   as the time left after the cache and the evaluation reserve (``eval_share``) allows, and is exported;
5. ``recyclegpt-eval quality`` (agreement by chained draft depth) and ``recyclegpt-eval speed``
   (tokens/s of every mode, accepted tokens per verification) on held-out text, the latter with the
   weights ``--quantize`` names (``auto``: w8a8 where the int8-activation kernels run, see
   :func:`speed_quantize`);
6. the base's perplexity of alternating's text against standard's, the module's agreement by depth on
   the base's own greedy text, and a markdown report with the time each phase took
   (``OUT/report.md``, ``OUT/report.json``).

Without ``../shared/data`` the config's TinyStories files are replaced by the embedded corpus
(the Python standard library) and held-out stdlib text is evaluated instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml

from recyclegpt.core import RecycleGPT, quant_kernels
from recyclegpt.core.losses import unrolled_losses
from recyclegpt.core.precision import auto_dtype, decode_dtype, dtype_name, hardware_summary
from recyclegpt.core.quantize import QUANTIZE_CHOICES, rounds_to_bf16
from recyclegpt.train.callbacks import TRAINED_LINE
from recyclegpt.train.corpus import STDLIB, CorpusError, check_readable, stdlib_heldout_text
from recyclegpt.train.selfgen import corpus_ids, mixed_prompts, self_generate_training_data, write_samples
from recyclegpt.train.trainer import AUTO, resolve_precision

CHAT_PROMPT_TOKENS = 64  # a chat request (--chat-share): SmolLM2's template with its system turn takes 30
BYTES_PER_TOKEN = 4.0  # English prose through a 49k BPE (TinyStories + SmolLM2: ~4.1); only for sizing
# The fit process loads the base again, then writes and logs the exported model: SmolLM2's fit spent
# 60-65 s outside training and its validation cache against a 22-25 s load in the recipe's first phase.
FIT_OVERHEAD_LOADS = 2.5


def _log(message: str) -> None:
    print(f"[recipe] {message}", flush=True)


def _autocast(dtype: torch.dtype) -> Any:
    return nullcontext() if dtype == torch.float32 else torch.autocast("cpu", dtype=dtype)


@torch.no_grad()
def base_tokens_per_second(model: RecycleGPT, block_size: int, compute: torch.dtype) -> float:
    ids = torch.randint(0, model.config.vocab_size, (4, block_size))
    with _autocast(compute):
        model.base_hidden(ids[:1, :32])
        start = time.perf_counter()
        model.base_hidden(ids)
    return ids.numel() / (time.perf_counter() - start)


def module_tokens_per_second(
    model: RecycleGPT, batch_size: int, block_size: int, depth: int, compute: torch.dtype = torch.float32
) -> float:
    """Unrolled module training (forward, backward, AdamW) over random features, in ``compute``
    (bf16: autocast, as Lightning's ``bf16-mixed``)."""
    # Same module and head; the base (unused) only as deep as the feature layers it names.
    probe = RecycleGPT(dataclasses.replace(model.config, num_layers=max(model.config.feature_layers, default=-1) + 2))
    if model.config.draft_vocab_size is not None:
        probe.set_draft_vocab(torch.arange(model.config.draft_vocab_size))
    probe.freeze_base()
    optimizer = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, block_size))
    hidden = torch.randn(batch_size, block_size, model.config.feature_width)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        with _autocast(compute):
            losses = unrolled_losses(probe, ids, hidden, depth=depth, distill=True)
        losses.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return ids.numel() / min(times[1:])


def _run(command: list[str], output: list[str] | None = None) -> float:
    """Run ``command``, its output streamed through; with ``output``, its lines are kept there too.
    Seconds it took."""
    _log("$ " + " ".join(command))
    start = time.perf_counter()
    if output is None:
        subprocess.run(command, check=True)
    else:
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
            for line in process.stdout:
                print(line, end="", flush=True)
                output.append(line.rstrip("\n"))
        if process.returncode:
            raise subprocess.CalledProcessError(process.returncode, command)
    return time.perf_counter() - start


@torch.no_grad()
def continuation_perplexity(
    model: RecycleGPT, prompts: list[torch.Tensor], new_tokens: int, max_depth: int = 5
) -> dict[str, Any]:
    """The base's perplexity of the text standard and alternating decoding wrote after each prompt,
    the fraction of alternating's tokens equal to standard's (greedy, EOS ignored), and the module's
    chained agreement by draft depth on standard's text: the text speculative decoding drafts on."""
    from recyclegpt.eval.quality import teacher_forced_quality

    nll = {"standard": 0.0, "alternating": 0.0}
    count, same = 0, 0
    standard_texts = []
    for prompt in prompts:
        outputs = {m: model.generate(prompt, new_tokens, decoding=m).sequences for m in nll}
        standard_texts.append(outputs["standard"])
        for mode, sequence in outputs.items():
            logits = model(sequence[:, :-1]).float()[:, prompt.shape[1] - 1 :]
            targets = sequence[:, prompt.shape[1] :]
            nll[mode] += float(torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="sum"))
        count += new_tokens
        same += int((outputs["standard"] == outputs["alternating"]).sum()) - prompt.shape[1]
    own_text = teacher_forced_quality(model, torch.cat(standard_texts), max_depth=max_depth)
    return {
        "standard_text_perplexity": math.exp(nll["standard"] / count),
        "alternating_text_perplexity": math.exp(nll["alternating"] / count),
        "alternating_identical_fraction": same / count,
        "own_text_agreement_by_depth": own_text["agreement_by_depth"],
    }


def expected_accepted(agreement_by_depth: dict[str, float]) -> dict[int, float]:
    """Mean tokens per verification (accepted + 1) by draft length, from chained per-depth agreement."""
    result, chain, total = {}, 1.0, 1.0
    for depth in sorted(agreement_by_depth, key=int):
        chain *= agreement_by_depth[depth]
        total += chain
        result[int(depth)] = total
    return result


def self_generate_corpus(
    model: RecycleGPT,
    prompt_files: list[str],
    out: Path,
    seconds: float,
    block_size: int,
    feature_cache: Path | None,
    storage: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The base's greedy continuations of prompts sliced from ``prompt_files`` as token blocks
    (``out/selfgen.safetensors``; readable in ``out/selfgen.txt``) within ``seconds``, decoded in the
    precision ``auto`` picks for this machine; the states it computed meanwhile become the training
    feature cache in ``feature_cache`` (None: no cache)."""
    ids = corpus_ids(model.tokenizer, prompt_files, args.selfgen_prompt_bytes)
    prompt_tokens = min(32, block_size // 2)
    dtype = auto_dtype("cpu")
    quantize = selfgen_quantize(args.selfgen_quantize)
    count = args.max_tokens // block_size + 1 if args.max_tokens else 100_000  # else more than any budget reaches
    chat_tokens = min(CHAT_PROMPT_TOKENS, block_size // 2)
    chat_ids = None
    if args.chat_prompts_from:
        chat_ids = corpus_ids(model.tokenizer, args.chat_prompts_from, args.selfgen_prompt_bytes)
    prompts = mixed_prompts(model.tokenizer, ids, count, prompt_tokens, args.chat_share, chat_tokens, chat_ids=chat_ids)
    blocks_path = out / "selfgen.safetensors"
    blocks, report = self_generate_training_data(
        model, prompts, block_size, dtype, blocks_path, feature_cache, storage, args.selfgen_batch, seconds, quantize
    )
    write_samples(model.tokenizer, blocks.tolist(), out / "selfgen.txt")
    return {
        "selfgen_blocks": str(blocks_path),
        "selfgen_samples": report.samples,
        "selfgen_new_tokens": report.new_tokens,
        "selfgen_tokens": blocks.numel(),
        "selfgen_tokens_per_s": report.tokens_per_second,
        "selfgen_dtype": dtype_name(dtype),
        "selfgen_quantize": quantize,
        "selfgen_cached_features": feature_cache is not None,
        "selfgen_chat_share": args.chat_share,
        "selfgen_chat_source": ", ".join(args.chat_prompts_from or prompt_files) if args.chat_share else None,
    }


def _fit_setting(config: dict[str, Any], fit_args: list[str], section: str, name: str, default: Any = None) -> Any:
    """``<section>.<name>`` as the fit will see it: a ``--<section>.<name>=`` argument, else the config's."""
    for arg in fit_args:
        if arg.startswith(f"--{section}.{name}="):
            return arg.split("=", 1)[1]
    return (config.get(section) or {}).get(name, default)


def training_precision(config: dict[str, Any], fit_args: list[str]) -> str | int:
    """The Lightning precision the fit will train the module in: a ``--trainer.precision=`` argument,
    else the config's, with ``auto`` resolved from the hardware (``bf16-mixed`` where bf16 is native:
    SmolLM2's unrolled module trained 1.9x faster per step than in fp32 on Zen 4 with AVX512-BF16)."""
    precision = _fit_setting(config, fit_args, "trainer", "precision", AUTO)
    return resolve_precision(precision, _fit_setting(config, fit_args, "trainer", "accelerator", "auto"))


def eval_reserve(dtype: torch.dtype, quantize: str) -> float:
    """Share of the budget the evaluation takes: 0.26 where the speed report also checks
    losslessness in fp32 on the unquantized weights (bf16, or kernels that round like bf16), else 0.16.
    Measured on SmolLM2, 30 minutes: 459 s with the fp32 check (bf16 + w8a8, AVX-512 BF16), 254 s
    without it (fp32 + w8a8, AVX2 emulated), where the 0.26 used for both left 4 minutes unused."""
    return 0.26 if dtype != torch.float32 or rounds_to_bf16(quantize) else 0.16


def _corpus_plan(config: dict[str, Any], args: argparse.Namespace, base_tps: float) -> dict[str, int]:
    """Training text to read when the module trains on the corpus itself (no self-generation)."""
    data = config["data"]
    tokens = int(args.cache_share * args.minutes * 60 * base_tps)
    tokens = max(tokens, 20 * data["block_size"])
    if args.max_tokens:
        tokens = min(tokens, args.max_tokens)
    if args.corpus_bytes:
        tokens = int(args.corpus_bytes / BYTES_PER_TOKEN)
    return {"corpus_tokens": tokens, "max_corpus_bytes": args.corpus_bytes or int(tokens * BYTES_PER_TOKEN)}


def _train_plan(
    config: dict[str, Any],
    args: argparse.Namespace,
    uncached_tokens: int,
    seconds_left: float,
    base_tps: float,
    module_tps: float,
    fit_overhead: float = 0.0,
) -> dict[str, int]:
    """Training time: ``--train-share`` of the budget, or by default the time the feature cache (the
    ``uncached_tokens`` of training text and the validation text through the base), the fit's own
    ``fit_overhead`` seconds (loading the base again, exporting) and the evaluation reserve leave.
    Training stops at that time (``trainer.max_time``; the cosine schedule follows it) or at twice
    the steps the calibrated speed predicts, whichever comes first: the calibration runs a cold,
    short loop and predicted 1.4x fewer steps than SmolLM2's module then trained. ``--steps`` fixes
    the step count instead, with no time limit."""
    data, trainer = config["data"], config["trainer"]
    budget = args.minutes * 60
    if args.train_share is not None:
        train_seconds = args.train_share * budget
    else:
        val_tokens = (data.get("max_val_bytes") or 0) / BYTES_PER_TOKEN
        cache_seconds = (uncached_tokens + val_tokens) / base_tps
        train_seconds = seconds_left - cache_seconds - fit_overhead - args.eval_share * budget
    row_tokens = data["batch_size"] * data["block_size"]
    predicted = max(20, int(max(train_seconds, 0.0) * module_tps / row_tokens))
    steps = args.steps or 2 * predicted
    if args.max_steps:
        steps = min(steps, args.max_steps)
    return {
        "max_steps": steps,
        "predicted_steps": predicted,
        "val_check_interval": min(steps, trainer.get("val_check_interval") or steps),
        "train_seconds": 0 if args.steps else math.ceil(max(train_seconds, 20 * row_tokens / module_tps)),
    }


def _duration(seconds: int) -> str:
    """Lightning's ``max_time`` format, DD:HH:MM:SS."""
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours // 24:02d}:{hours % 24:02d}:{minutes:02d}:{secs:02d}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="recyclegpt-recipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/smollm2.yaml", help="a recyclegpt-train config (frozen_base)")
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget of the whole recipe")
    parser.add_argument("--cache-share", type=float, default=0.25, help="share of the budget for the feature cache")
    parser.add_argument(
        "--train-share",
        type=float,
        default=None,
        help="share of the budget for module training (default: what the other phases and --eval-share leave)",
    )
    parser.add_argument(
        "--eval-share",
        type=float,
        default=None,
        help="share of the budget kept for the evaluation (default: what it measured, see eval_reserve)",
    )
    parser.add_argument(
        "--selfgen-share",
        type=float,
        default=0.20,
        # SmolLM2 in 30 minutes is short of steps, not text. Agreement at depths 1 / 3 / 5 on the base's
        # own text: 0.20 (221k tokens, 770 steps) 0.635 / 0.599 / 0.617; 0.30 (336k, 537 steps)
        # 0.626 / 0.588 / 0.581; 0.45 (557k, 220 steps, fp32 training) 0.498 / 0.453 / 0.471.
        # Real AVX2 Zen 3, fp32 training: 0.20 (180k, 516 steps) 0.568 / 0.556 / 0.546; 0.35 (295k,
        # 359 steps) 0.540 / 0.511 / 0.496.
        help="share of the budget the base spends writing the training text itself, and with it the "
        "training features (0: train on the corpus text)",
    )
    parser.add_argument(
        "--chat-share",
        type=float,
        default=0.0,
        help="share of the self-generation prompts made chat requests of 64 tokens (the tokenizer's chat "
        "template around an instruction and a corpus slice): an instruction-tuned base then writes "
        "assistant turns for its module to learn as well (see recyclegpt.train.selfgen.chat_prompts)",
    )
    parser.add_argument(
        "--chat-prompts-from",
        nargs="+",
        default=None,
        help="text the chat requests quote (files, directories or globs; default: the training text)",
    )
    parser.add_argument(
        "--selfgen-batch",
        type=int,
        default=64,
        help="prompts the base continues together (64: ~1.4x the tokens/s of 16)",
    )
    parser.add_argument(
        "--selfgen-quantize",
        choices=("auto", *QUANTIZE_CHOICES),
        default="auto",
        help="the base's weights while it writes (auto: w8a8 where its integer kernels run, else none); the "
        "training features are the states of that base",
    )
    parser.add_argument("--selfgen-prompt-bytes", type=int, default=1_000_000, help="corpus text prompts come from")
    parser.add_argument("--max-tokens", type=int, default=None, help="cap on the training corpus (tokens)")
    parser.add_argument("--max-steps", type=int, default=None, help="cap on the optimizer steps")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (instead of the calibrated plan)")
    parser.add_argument("--corpus-bytes", type=int, default=None, help="training text read (instead of the plan)")
    parser.add_argument("--eval-prompts", type=int, default=6, help="held-out prompts for speed and perplexity")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument(
        "--quantize",
        choices=("auto", *QUANTIZE_CHOICES),
        default="auto",
        help="weights of the speed report (auto: w8a8 where its integer kernels run, else int8 on CPUs "
        "without native bf16 and none elsewhere)",
    )
    parser.add_argument("--out", default=None, help="report directory (default: beside the exported model)")
    parser.add_argument("fit_args", nargs="*", help="extra recyclegpt-train fit arguments (after --)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    phases: dict[str, float] = {}
    try:
        import recyclegpt.eval  # noqa: F401 - the recipe's report runs recyclegpt-eval
    except ImportError:
        sys.exit("recyclegpt-recipe: error: needs recyclegpt-eval (pip install -e packages/eval)")
    if not 0 <= args.chat_share <= 1:
        sys.exit(f"recyclegpt-recipe: error: --chat-share must be between 0 and 1, got {args.chat_share}")
    if args.chat_prompts_from:
        if args.chat_share <= 0:
            sys.exit(
                "recyclegpt-recipe: error: --chat-prompts-from is the text of chat requests: give --chat-share > 0"
            )
        try:
            check_readable(args.chat_prompts_from)
        except CorpusError as error:
            sys.exit(f"recyclegpt-recipe: error: --chat-prompts-from: {error}")
    if args.chat_share > 0 and args.selfgen_share <= 0:
        sys.exit(
            "recyclegpt-recipe: error: --chat-share makes self-generation prompts chat requests: needs --selfgen-share > 0"
        )
    config_path = Path(args.config)
    if not config_path.exists():
        sys.exit(f"recyclegpt-recipe: error: no config {config_path}")
    config = yaml.safe_load(config_path.read_text())
    model_cfg, data = config["model"], config["data"]
    if model_cfg.get("regime") != "frozen_base":
        sys.exit("recyclegpt-recipe: error: the recipe trains a module on a frozen base (model.regime frozen_base)")
    export_dir = Path(config.get("export", {}).get("dirpath", "runs/model"))
    out = Path(args.out) if args.out else export_dir.parent / "recipe"
    out.mkdir(parents=True, exist_ok=True)
    cache_dtype = auto_dtype("cpu")
    precision = training_precision(config, args.fit_args)
    train_dtype = torch.bfloat16 if str(precision).startswith("bf16") else torch.float32
    _log(
        f"hardware: {hardware_summary()}; feature cache computes in {dtype_name(cache_dtype)}, "
        f"module trains in {precision}"
    )

    # 1. fetch and load the base.
    start = time.perf_counter()
    model = RecycleGPT.from_pretrained(
        model_cfg["pretrained"],
        module_layers=model_cfg.get("module_layers", 1),
        feature_layers=model_cfg.get("feature_layers") or [],
    )
    if model_cfg.get("draft_vocab_size"):
        model.set_draft_vocab(torch.arange(model_cfg["draft_vocab_size"]))  # sizes only, for calibration
    phases["fetch + load base"] = time.perf_counter() - start
    if args.chat_share > 0 and not getattr(model.tokenizer, "chat_template", None):
        sys.exit(
            f"recyclegpt-recipe: error: --chat-share needs a chat template; {model_cfg['pretrained']}'s tokenizer has none"
        )

    # Data: the config's files, or the embedded corpus when they are missing.
    overrides: list[str] = []
    train_files = [str(f) for f in data.get("train_files") or []]
    heldout = out / "heldout.txt"
    if train_files and all(Path(f).exists() for f in train_files):
        val_files = data.get("val_files") or []
        heldout = Path(val_files[0]) if val_files else heldout
        source = ", ".join(train_files)
    else:
        _log(f"{', '.join(train_files)} not found: training on the embedded corpus (Python standard library)")
        # validation reads the held-out stdlib text (written below), so the training blocks stay whole
        overrides += [f"--data.train_files=[{STDLIB}]", f"--data.val_files=[{heldout}]"]
        source = "stdlib"

    # 2. calibrate and plan.
    start = time.perf_counter()
    depth = int(model_cfg.get("unroll_depth", 1))
    base_tps = base_tokens_per_second(model, data["block_size"], cache_dtype)
    module_tps = module_tokens_per_second(model, data["batch_size"], data["block_size"], depth, train_dtype) / 1.15
    plan: dict[str, Any] = _corpus_plan(config, args, base_tps)
    phases["calibrate"] = time.perf_counter() - start
    _log(
        f"base {base_tps:.0f} tok/s ({dtype_name(cache_dtype)}), module training {module_tps:.0f} tok/s at depth {depth}"
    )
    if source == "stdlib":  # held-out text starts after everything training or the prompts read
        skip = max(plan["max_corpus_bytes"], args.selfgen_prompt_bytes if args.selfgen_share > 0 else 0)
        heldout.write_text(stdlib_heldout_text(skip, 200_000), encoding="utf-8")

    # 3. the base writes its own training text (prompts sliced from the training corpus), keeping
    # the states it computes meanwhile as the training feature cache.
    cache_dir = _fit_setting(config, args.fit_args, "data", "feature_cache")
    uncached_tokens = plan["corpus_tokens"]
    if args.selfgen_share > 0:
        start = time.perf_counter()
        prompt_files = [STDLIB] if source == "stdlib" else train_files
        selfgen = self_generate_corpus(
            model,
            prompt_files,
            out,
            args.selfgen_share * args.minutes * 60,
            data["block_size"],
            Path(cache_dir, "train") if cache_dir else None,
            _fit_setting(config, args.fit_args, "data", "feature_dtype") or "bf16",
            args,
        )
        overrides += [f"--data.train_blocks={selfgen['selfgen_blocks']}"]
        if cache_dir:  # the trainer keys (and builds the validation cache) with the same weights
            overrides += [f"--data.feature_quantize={selfgen['selfgen_quantize']}"]
        plan.update(selfgen)
        plan["corpus_tokens"] = selfgen["selfgen_tokens"]
        uncached_tokens = 0 if cache_dir else plan["corpus_tokens"]
        phases["self-generate (+ train features)"] = time.perf_counter() - start
        _log(
            f"self-generated {selfgen['selfgen_samples']} blocks, {selfgen['selfgen_new_tokens']} new tokens "
            f"at {selfgen['selfgen_tokens_per_s']:.0f} tokens/s ({_weights(selfgen)}): {selfgen['selfgen_blocks']}"
        )

    del model
    seconds_left = args.minutes * 60 - (time.perf_counter() - started)
    fit_overhead = FIT_OVERHEAD_LOADS * phases["fetch + load base"]
    quantize = speed_quantize(args.quantize, cache_dtype)  # the speed report's weights
    decode = decode_dtype("cpu", quantize)  # and its precision: what --dtype auto decodes them in here
    if args.eval_share is None:
        args.eval_share = eval_reserve(decode, quantize)
    plan["eval_share"] = args.eval_share
    plan.update(_train_plan(config, args, uncached_tokens, seconds_left, base_tps, module_tps, fit_overhead))
    limit = f"{plan['train_seconds']} s or " if plan["train_seconds"] else ""
    _log(
        f"corpus {plan['corpus_tokens']} tokens; training for {limit}{plan['max_steps']} steps "
        f"(~{plan['predicted_steps']} at the calibrated speed)"
    )

    # 4. train (features cached once, then the module over them) and export.
    fit = [
        sys.executable,
        "-m",
        "recyclegpt.train.cli",
        "fit",
        f"--config={config_path}",
        f"--trainer.precision={precision}",
        f"--trainer.max_steps={plan['max_steps']}",
        f"--trainer.val_check_interval={plan['val_check_interval']}",
        "--trainer.check_val_every_n_epoch=null",  # validation counted in steps across the many epochs
        *([f"--trainer.max_time={_duration(plan['train_seconds'])}"] if plan["train_seconds"] else []),
        # training blocks written by self-generation are read whole: no corpus size to pass then
        *([] if args.selfgen_share > 0 else [f"--data.max_corpus_bytes={plan['max_corpus_bytes']}"]),
        *overrides,
        *args.fit_args,
    ]
    fit_output: list[str] = []
    phases["fit (cache + train + export)"] = _run(fit, fit_output)
    trained = [line for line in fit_output if line.startswith(TRAINED_LINE)]
    plan["trained_steps"] = int(trained[-1].removeprefix(TRAINED_LINE).split()[0]) if trained else None
    for split in ("train", "val"):
        manifest = Path(cache_dir or "", split, "manifest.json")
        if cache_dir and manifest.exists():
            stored = json.loads(manifest.read_text())
            if not (split == "train" and plan.get("selfgen_cached_features")):  # else kept while generating
                phases[f"  of which feature cache ({split})"] = stored.get("build_seconds", 0)
            plan[f"{split}_tokens_cached"] = stored.get("tokens", 0)

    # 5. evaluate on held-out text.
    eval_cli = [sys.executable, "-m", "recyclegpt.eval.cli"]
    dtype = dtype_name(decode)
    max_depth = max(depth + 2, 5)
    phases["eval quality"] = _run(
        [*eval_cli, "quality", "--model", str(export_dir), "--data", str(heldout), "--max-tokens", "1536"]
        + ["--max-depth", str(max_depth), "--num-prompts", str(args.eval_prompts), "--dtype", dtype]
        + ["--max-new-tokens", str(args.new_tokens), "--json", str(out / "quality.json")]
    )
    phases["eval speed"] = _run(
        [*eval_cli, "speed", "--model", str(export_dir), "--data", str(heldout), "--repeats", "1"]
        + ["--num-prompts", str(args.eval_prompts), "--max-new-tokens", str(args.new_tokens), "--dtype", dtype]
        + ["--quantize", quantize, "--json", str(out / "speed.json")]
    )

    # 6. alternating's cost in quality, agreement on the base's own text, and the report.
    start = time.perf_counter()
    from recyclegpt.eval.data import load_model, prompts_from_ids, read_text, tokenize

    net = load_model(str(export_dir), dtype)
    ids = tokenize(net.tokenizer, read_text(str(heldout)), net.config.vocab_size)
    prompts = prompts_from_ids(ids, args.eval_prompts, 32)
    alternating = continuation_perplexity(net, prompts, args.new_tokens, max_depth)
    phases["alternating text perplexity"] = time.perf_counter() - start
    phases["total"] = time.perf_counter() - started
    quality = json.loads((out / "quality.json").read_text())
    speed = json.loads((out / "speed.json").read_text())
    report = {
        "hardware": hardware_summary(),
        "data": source,
        "heldout": str(heldout),
        "plan": plan,
        "phases_s": phases,
        "quality": quality,
        "speed": speed,
        "speed_weights": dtype if quantize == "none" else f"{dtype} + {quantize}",
        "alternating": alternating,
        "model": str(export_dir.resolve()),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render(report, model_cfg)
    (out / "report.md").write_text(markdown)
    print(markdown, flush=True)
    _log(f"model: {export_dir.resolve()}  report: {(out / 'report.md').resolve()}")


def _int8_activation_kernels_run() -> bool:
    """Does this machine decode w8a8 on integer kernels (a CPU run: AVX-512 VNNI or AVX2)?"""
    return not torch.cuda.is_available() and quant_kernels.dynamic_available()


def selfgen_quantize(choice: str) -> str:
    """The base's weights while it writes the training text. ``auto``: w8a8 on CPUs where its
    integer kernels run (:func:`recyclegpt.core.quant_kernels.dynamic_isa`; SmolLM2 at batch 64:
    AVX-512 VNNI, bf16, 591 tokens/s against 307 unquantized; the AVX2 kernels, fp32, with torch
    restricted to AVX2 on the same Zen 4, 333-342 against 273), else none."""
    if choice != "auto":
        return choice
    return "w8a8" if _int8_activation_kernels_run() else "none"


def _weights(selfgen: dict[str, Any]) -> str:
    quantize = selfgen.get("selfgen_quantize", "none")
    return selfgen["selfgen_dtype"] + ("" if quantize == "none" else f" + {quantize}")


def speed_quantize(choice: str, compute: torch.dtype) -> str:
    """The weights the speed report decodes with. ``auto``: w8a8 where its integer kernels run
    (AVX-512 VNNI or AVX2: the cheapest k-token verification there, a 5-token step of SmolLM2's
    linears ~1.4x a 1-token one with VNNI, ~1.7x with AVX2, against 2-3x for torch's int8 kernel);
    elsewhere (the kernels not built, or switched off) unquantized where the hardware computes bf16
    natively and int8 otherwise (fp32 verification is dear there: AVX2, a 2-token step ~1.7x)."""
    if choice != "auto":
        return choice
    if _int8_activation_kernels_run():
        return "w8a8"
    return "none" if compute == torch.bfloat16 else "int8"


def _find(tree: Any, key: str) -> Any:
    """The first value of ``key`` anywhere in a nested JSON tree."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for value in tree.values():
            found = _find(value, key)
            if found is not None:
                return found
    return None


def _agreement_rows(where: str, agreement: dict[str, float]) -> list[str]:
    """Two table rows: chained agreement by depth, and the tokens per verification it implies."""
    depths = sorted(agreement, key=int)
    expected = expected_accepted(agreement)
    return [
        f"| agreement ({where}) | " + " | ".join(f"{agreement[k]:.3f}" for k in depths) + " |",
        f"| expected tokens/verify ({where}) | " + " | ".join(f"{expected[int(k)]:.2f}" for k in depths) + " |",
    ]


def render(report: dict[str, Any], model_cfg: dict[str, Any]) -> str:
    """The report as markdown tables."""
    agreement = _find(report["quality"], "agreement_by_depth") or {}
    speed = report["speed"]
    lines = [
        f"## SmolLM2 recipe: {report['hardware']}",
        "",
        f"Module: {model_cfg.get('module_layers', 1)} layer, unroll depth {model_cfg.get('unroll_depth', 1)}, "
        f"distill={model_cfg.get('distill', False)}, draft vocabulary {model_cfg.get('draft_vocab_size')}, "
        f"init {model_cfg.get('module_init', 'random')}, "
        f"feature layers {model_cfg.get('feature_layers') or 'none'} + final; data {report['data']}; "
        f"{report['plan']['corpus_tokens']} corpus tokens"
        + (f" written by the base ({_weights(report['plan'])})" if "selfgen_dtype" in report["plan"] else "")
        + (
            f", {report['plan']['selfgen_chat_share']:.0%} of its prompts chat requests quoting "
            f"{report['plan'].get('selfgen_chat_source')}"
            if report["plan"].get("selfgen_chat_share")
            else ""
        )
        + f", {report['plan'].get('trained_steps') or report['plan']['max_steps']} steps.",
        "",
        "| draft depth | " + " | ".join(sorted(agreement, key=int)) + " |",
        "|---|" + "---|" * len(agreement),
        *_agreement_rows("held-out", agreement),
    ]
    own = report["alternating"].get("own_text_agreement_by_depth") or {}
    if own:
        lines += _agreement_rows("on the base's own greedy text", own)
    lines += [
        "",
        f"Decoding speed with {report['speed_weights']} weights:",
        "",
        "| mode | tokens/s | speedup | tokens per verify | identical to standard |",
        "|---|---|---|---|---|",
    ]
    for name in ("transformers", "standard", "alternating"):
        entry = speed.get(name, {})
        lines.append(
            f"| {name} | {entry.get('tokens_per_s', 0):.1f} | {entry.get('speedup', 0):.2f}x | "
            f"| {entry.get('identical_to_standard')} |"
        )
    for length, entry in sorted(
        speed.get("speculative", {}).get("by_draft_length", {}).items(), key=lambda x: int(x[0])
    ):
        lines.append(
            f"| speculative@{length} | {entry['tokens_per_s']:.1f} | {entry['speedup']:.2f}x | "
            f"{entry.get('accepted_per_verify', 0) + 1:.2f} | {entry['identical_to_standard']} |"
        )
    for policy in ("adaptive", "tree"):
        entry = speed.get("speculative", {}).get(policy)
        if entry:
            lines.append(
                f"| speculative {policy} | {entry['tokens_per_s']:.1f} | {entry['speedup']:.2f}x | "
                f"{1 / entry['full_calls_per_token']:.2f} per full call | {entry['identical_to_standard']} |"
            )
    alt = report["alternating"]
    lossless = speed.get("speculative", {})
    if "identical_to_standard_fp32" in lossless:
        lines += [
            "",
            f"Speculative equals standard token for token in fp32: {lossless['identical_to_standard_fp32']}; "
            f"where it differs in bf16, only at logit ties: {lossless.get('identical_up_to_ties')}.",
        ]
    lines += [
        "",
        f"Alternating: {alt['alternating_identical_fraction']:.1%} of its tokens equal standard's; the base's "
        f"perplexity of its text {alt['alternating_text_perplexity']:.2f} vs standard's {alt['standard_text_perplexity']:.2f}.",
        "",
        "| phase | seconds |",
        "|---|---|",
        *(f"| {name} | {seconds:.0f} |" for name, seconds in report["phases_s"].items()),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
