"""`insightv <command>`: a thin layer; each command calls one library function.

Bad input ends with `error: <one line>` on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from insightv_jax.allocator import reexec_with_allocator
from insightv_jax.errors import InsightVError


def _convert_hf2jax(args: argparse.Namespace) -> None:
    from insightv_jax.checkpoint import atomic_dir
    from insightv_jax.config import save_yaml, to_dict
    from insightv_jax.data.prompts import read_prompts, write_prompts
    from insightv_jax.hf.convert import import_hf
    from insightv_jax.hf.files import copy_aux_dirs
    from insightv_jax.parallel import make_mesh

    src, out = Path(args.src), Path(args.out)
    if not src.is_dir():
        raise InsightVError(f"{src}: Hugging Face folder not found")
    t0 = time.time()
    model, cfg = import_hf(src, make_mesh())
    import orbax.checkpoint as ocp
    from flax import nnx

    with atomic_dir(out, overwrite=args.overwrite) as tmp:
        save_yaml({"model": to_dict(cfg)}, tmp / "config.yaml")
        copy_aux_dirs(tmp, src, src)
        prompts = read_prompts(src)  # the agent's training wording, if the export has it
        if prompts is not None:
            write_prompts(tmp, prompts)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save((tmp / "params").absolute(), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
            ckptr.wait_until_finished()
    n = sum(x.size for x in __import__("jax").tree.leaves(nnx.state(model, nnx.Param)))
    print(f"converted {src} -> {out} ({cfg.kind}, {n / 1e6:.2f}M params, {time.time() - t0:.1f}s)")


def _convert_jax2hf(args: argparse.Namespace) -> None:
    from insightv_jax.checkpoint import atomic_dir, load_model
    from insightv_jax.data.prompts import read_prompts
    from insightv_jax.hf.convert import export_hf

    t0 = time.time()
    model, cfg, tok_dir, proc_dir = load_model(args.src)
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        export_hf(model, cfg, tmp, tok_dir, proc_dir, prompts=read_prompts(args.src))
    print(f"exported {args.src} -> {args.out} ({cfg.kind}, {time.time() - t0:.1f}s)")


def _infer(args: argparse.Namespace) -> None:
    import json

    from insightv_jax.sample.infer import InferSettings, _check_row, infer, read_rows

    settings = InferSettings.for_decoding(
        args.decoding,
        reason_max_tokens=args.max_reason_tokens,
        summary_max_tokens=args.max_summary_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    if args.batch:
        rows, errors = read_rows(Path(args.batch))
        for e in errors:
            print(f"skipped {e}", file=sys.stderr)
        if not rows:
            raise InsightVError(f"{args.batch}: no valid rows")
    else:
        if args.question is None:
            raise InsightVError("give --question (and optionally --image) or --batch FILE.jsonl")
        rows, errors = (
            [_check_row({"question": args.question, "image": args.image}, "--question")],
            [],
        )
    results = infer(args.reason, args.summary, rows, settings)
    out = open(args.out, "w") if args.out else None
    for r in results:
        if out:
            out.write(json.dumps(r) + "\n")
        if args.show_chain:
            print(f"[{r['id']}] chain:\n{r['chain']}")
        print(f"[{r['id']}] answer: {r['answer']}")
    if out:
        out.close()
    if errors:
        print(f"{len(errors)} bad rows skipped, {len(results)} answered", file=sys.stderr)


def _serve(args: argparse.Namespace) -> None:
    from insightv_jax.serve.launch import ServeSettings, build_server, run_server
    from insightv_jax.serve.protocol import Limits

    for flag in ("slots", "context", "chunk", "max_tokens", "max_queue", "max_body_bytes",
                 "max_image_bytes", "reason_max_tokens"):  # fmt: skip
        if getattr(args, flag) < 1:
            raise InsightVError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.image_root and not Path(args.image_root).is_dir():
        raise InsightVError(f"--image-root {args.image_root}: not a directory")
    limits = Limits(max_tokens=args.max_tokens, max_n=args.slots, max_queue=args.max_queue,
                    max_body_bytes=args.max_body_bytes, max_image_bytes=args.max_image_bytes)  # fmt: skip
    settings = ServeSettings(slots=args.slots, context=args.context, chunk=args.chunk,
                             reason_max_tokens=args.reason_max_tokens, limits=limits)  # fmt: skip
    server = build_server(args.model, args.summary, name=args.name, host=args.host,
                          port=args.port, settings=settings, image_root=args.image_root,
                          quiet=args.quiet)  # fmt: skip
    run_server(server)


def _demo(args: argparse.Namespace) -> None:
    from insightv_jax.demo import run_demo

    seeds = None
    if args.seeds:
        try:
            seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            raise InsightVError(f"--seeds {args.seeds!r}: not a comma-separated list of "
                                "integers") from None  # fmt: skip
    run_demo(args.preset, args.workdir, seeds=seeds)


def _synth(args: argparse.Namespace) -> None:
    from insightv_jax.data.synthetic.scenes import Knobs

    knobs = Knobs(grid_size=args.grid_size, max_hops=args.max_hops)
    t0 = time.time()
    if args.format == "arrayrecord":
        from insightv_jax.data.synthetic.tfds_builder import write_arrayrecord

        where = write_arrayrecord(args.out, args.n, args.seed, knobs)
        print(
            f"wrote {args.n} items per split (train/val/test) to {where} ({time.time() - t0:.1f}s)"
        )
    else:
        from insightv_jax.data.synthetic.writer import write_llava

        counts = write_llava(args.out, args.n, args.seed, knobs)
        print(f"wrote {counts} to {args.out} ({time.time() - t0:.1f}s)")


def _data_validate(args: argparse.Namespace) -> None:
    from insightv_jax.data.sources import open_source
    from insightv_jax.data.validate import Limits, approx_token_count, validate_source
    from insightv_jax.errors import DataError

    count = approx_token_count
    if args.tokenizer:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(args.tokenizer)
        except (OSError, ValueError) as e:  # a missing folder or a corrupt tokenizer.json
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise DataError(f"{args.tokenizer}: cannot load the tokenizer ({why})") from None
        count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
    source = open_source(args.file, split=args.split, root=args.root)
    limits = Limits(max_length=args.max_length, image_tokens=args.image_tokens, count_tokens=count)
    report = validate_source(source, limits)
    for rid, reason in report.bad:
        print(f"{rid}: {reason}")
    print(f"{report.total} records: {len(report.good)} ok, {len(report.bad)} bad")
    if report.bad:
        raise DataError(f"{args.file}: {len(report.bad)} bad record(s)")


def _bench(args: argparse.Namespace) -> None:
    import json

    from insightv_jax.bench import BENCHES, SIZED

    if args.size and args.name not in SIZED:
        raise InsightVError(f"bench {args.name} takes no --size (only {', '.join(SIZED)})")
    kwargs = {"size": args.size} if args.size else {}
    print(json.dumps({args.name: BENCHES[args.name](**kwargs)}, indent=2))


def _eval(args: argparse.Namespace) -> None:
    from insightv_jax.config import load_config
    from insightv_jax.eval.harness import evaluate

    cfg = load_config(args.config, args.overrides)
    evaluate(cfg)
    if cfg.eval.decoding == "both":
        print(f"reports written to {cfg.eval.out}/reference/ and {cfg.eval.out}/greedy/ "
              f"(report.json, report.txt, report.png; both tables in {cfg.eval.out}/report.txt)")  # fmt: skip
    else:
        print(f"report written to {cfg.eval.out}/report.json (+ report.txt, report.png)")


def _sft(args: argparse.Namespace) -> None:
    from insightv_jax.config import load_config
    from insightv_jax.train import run_sft

    run_sft(load_config(args.config, args.overrides))


def _dpo(args: argparse.Namespace) -> None:
    from insightv_jax.config import load_config
    from insightv_jax.train.dpo import run_dpo

    run_dpo(load_config(args.config, args.overrides))


def _iterate(args: argparse.Namespace) -> None:
    from insightv_jax.config import load_config
    from insightv_jax.train.iterate import run_iterate

    run_iterate(load_config(args.config, args.overrides), rounds=args.rounds)


def _rl(args: argparse.Namespace) -> None:
    from insightv_jax.config import load_config
    from insightv_jax.train.rl.loop import run_rl

    overrides = list(args.overrides) + ([f"rl.agent={args.agent}"] if args.agent else [])
    run_rl(load_config(args.config, overrides), rounds=args.rounds)


def _rl_toy(args: argparse.Namespace) -> None:
    from insightv_jax.train.rl.toy import run_toy, toy_config

    toy = toy_config(args.workdir, args.overrides, steps=args.steps, seed=args.seed,
                     questions=args.questions, start_accuracy=args.start_accuracy)  # fmt: skip
    run_toy(toy, control=not args.no_control)


def _pipeline(args: argparse.Namespace) -> None:
    import json

    from insightv_jax.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.command == "generate":
        from insightv_jax.pipeline.generate import run_generate

        print(json.dumps(run_generate(cfg), indent=1))
    elif args.command == "assess":
        from insightv_jax.pipeline.assess import run_assess

        print(json.dumps(run_assess(cfg), indent=1))
    elif args.command == "agent-chains":
        from insightv_jax.pipeline.agent_chains import run_agent_chains

        print(json.dumps(run_agent_chains(cfg), indent=1))
    else:
        from insightv_jax.pipeline.build import format_table, run_build

        print(format_table(run_build(cfg)))


def _plan(args: argparse.Namespace) -> None:
    from insightv_jax.config import load_config
    from insightv_jax.train.plan import plan_in_subprocess

    devices = args.devices
    cfg = load_config(args.config, args.overrides)  # bad config: one-line error here
    if devices is None:  # the mesh's size when it names every axis
        m = cfg.mesh
        if -1 in (m.data, m.fsdp, m.tensor):
            raise InsightVError(f"{args.config}: mesh has a -1 axis; pass --devices N")
        devices = m.data * m.fsdp * m.tensor
    proc = plan_in_subprocess(args.config, args.overrides, devices)
    if proc.returncode:
        raise InsightVError(f"plan for {args.config} on {devices} devices failed")


def build_parser() -> argparse.ArgumentParser:
    """`insightv`'s arguments: one subcommand per stage, each added by its own function."""
    parser = argparse.ArgumentParser(
        prog="insightv", description="Insight-V long-chain visual reasoning in JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_convert, _add_synth, _add_data, _add_bench, _add_infer, _add_serve,
                _add_training, _add_pipeline, _add_eval, _add_demo):  # fmt: skip
        add(sub)
    return parser


def _add_config_command(sub, name: str, what: str, config_help: str, func, *extra) -> None:
    """A subcommand of `--config YAML`, the `extra` (flag, keywords) arguments and
    `key=value` overrides."""
    p = sub.add_parser(name, help=what)
    p.add_argument("--config", required=True, help=config_help)
    for flag, kw in extra:
        p.add_argument(flag, **kw)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.set_defaults(func=func)


def _add_convert(sub) -> None:
    convert = sub.add_parser("convert", help="checkpoint conversion (hf2jax, jax2hf)")
    csub = convert.add_subparsers(dest="direction", required=True)
    for name, fn, src_help, out_help in (
        ("hf2jax", _convert_hf2jax, "Hugging Face folder", "model directory to write"),
        ("jax2hf", _convert_jax2hf, "model dir, run dir or HF folder", "HF folder to write"),
    ):
        p = csub.add_parser(name, help=f"{src_help} -> {out_help}")
        p.add_argument("--src", required=True, help=src_help)
        p.add_argument("--out", required=True, help=out_help)
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        p.set_defaults(func=fn)


def _add_synth(sub) -> None:
    synth = sub.add_parser("synth", help="write the synthetic visual-reasoning dataset")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--n", type=int, default=1000, help="items per split")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--format", choices=["llava", "arrayrecord"], default="llava")
    synth.add_argument("--grid-size", type=int, default=4, help="grid cells per side")
    synth.add_argument("--max-hops", type=int, default=2, help="most spatial hops per question")
    synth.set_defaults(func=_synth)


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="dataset tools")
    dsub = data.add_subparsers(dest="data_command", required=True)
    val = dsub.add_parser("validate", help="check every record; one line per bad record")
    val.add_argument("file", help=".json, .jsonl or a tfds ArrayRecord directory")
    val.add_argument("--split", default="train", help="split of a tfds directory")
    val.add_argument("--root", default=None, help="image root (default: the file's folder)")
    val.add_argument("--max-length", type=int, default=4096, help="tokens after image expansion")
    val.add_argument("--image-tokens", type=int, default=16, help="tokens per image")
    val.add_argument("--tokenizer", default=None, help="tokenizer folder (default: word count)")
    val.set_defaults(func=_data_validate)


def _add_bench(sub) -> None:
    from insightv_jax.bench import BENCHES  # stdlib-only at import time

    bench = sub.add_parser("bench", help="throughput benchmarks")
    bench.add_argument("name", choices=sorted(BENCHES), help="which benchmark")
    bench.add_argument(
        "--size",
        choices=("1b", "toy"),
        help="train, sample: the ~1B bf16 decoder and VLM (configs/bench-1b.yaml, "
        "bench-vlm-1b.yaml) against transformers on the GPU JAX runs on; toy: them shrunk",
    )
    bench.set_defaults(func=_bench)


def _add_infer(sub) -> None:
    inf = sub.add_parser("infer", help="two-agent answer: reasoning agent -> summary agent")
    inf.add_argument("--reason", required=True, help="reasoning agent checkpoint")
    inf.add_argument("--summary", required=True, help="summary agent checkpoint")
    inf.add_argument("--question", help="one question")
    inf.add_argument("--image", help="its image (vision-language agents)")
    inf.add_argument("--batch", help="JSONL file of {id, question, image} rows")
    inf.add_argument("--out", help="write results as JSONL here")
    inf.add_argument("--show-chain", action="store_true", help="print the reasoning chain")
    inf.add_argument("--max-reason-tokens", type=int, default=256)
    inf.add_argument("--max-summary-tokens", type=int, default=64)
    inf.add_argument("--seed", type=int, default=0)
    inf.add_argument("--decoding", choices=("reference", "greedy"), default="reference",
                     help="reference: both agents at temperature 0.2, top-p 0.95 (the authors' "
                     "inference script; what `insightv eval` uses); greedy: both greedy")  # fmt: skip
    inf.add_argument("--batch-size", type=int, default=8, help="questions per sampler call")
    inf.set_defaults(func=_infer)


def _add_serve(sub) -> None:
    srv = sub.add_parser("serve", help="an OpenAI-compatible chat server with continuous batching")
    srv.add_argument("--model", required=True, help="agent checkpoint (the reasoning agent "
                     "with --summary)")  # fmt: skip
    srv.add_argument("--summary", help="summary agent checkpoint: also serve model two-agent")
    srv.add_argument("--name", help="the --model agent's model name (default: its folder name)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    srv.add_argument("--port", type=int, default=8000, help="0: any free port")
    srv.add_argument("--slots", type=int, default=8, help="decode rows per agent (batch size)")
    srv.add_argument("--context", type=int, default=2048,
                     help="tokens per row, prompt + reply (capped by the model's positions)")  # fmt: skip
    srv.add_argument("--chunk", type=int, default=16, help="tokens decoded between joins")
    srv.add_argument("--max-tokens", type=int, default=512, help="most new tokens per request")
    srv.add_argument("--max-queue", type=int, default=64,
                     help="requests waiting per agent before 429")  # fmt: skip
    srv.add_argument("--max-body-bytes", type=int, default=32 << 20, help="413 beyond")
    srv.add_argument("--max-image-bytes", type=int, default=8 << 20, help="per image")
    srv.add_argument("--image-root", help="allow image_url file paths under this directory")
    srv.add_argument("--reason-max-tokens", type=int, default=256,
                     help="two-agent: tokens of the reasoning chain")  # fmt: skip
    srv.add_argument("--quiet", action="store_true", help="no access log")
    srv.set_defaults(func=_serve)


def _add_training(sub) -> None:
    """sft, dpo, iterate, rl and plan: a run config and its overrides."""
    _add_config_command(
        sub, "sft", "supervised fine-tuning (reasoning or summary agent)",
        "run config YAML (configs/train/...)", _sft,
    )  # fmt: skip
    _add_config_command(
        sub, "dpo", "DPO of the reasoning agent on a preference-pair file",
        "run config YAML (configs/dpo/...)", _dpo,
    )  # fmt: skip
    _add_config_command(
        sub, "iterate", "iterative DPO: sample, judge, score, pairs, DPO per round",
        "run config YAML (configs/dpo/...)", _iterate,
        ("--rounds", {"type": int, "default": None, "help": "rounds T (default: dpo.rounds)"}),
    )  # fmt: skip
    _add_config_command(
        sub, "rl", "on-policy RL rounds (GRPO family): sample, judge, update per round",
        "run config YAML (configs/rl/...)", _rl,
        ("--rounds", {"type": int, "default": None, "help": "rounds T (default: rl.rounds)"}),
        ("--agent", {"choices": ["reason", "summary", "both"], "default": None,
                     "help": "which agent RL trains (default: rl.agent)"}),
    )  # fmt: skip
    toy = sub.add_parser(
        "rl-toy", help="RL on a verifiable toy (two-digit addition): SFT start, RL, "
        "shuffled-reward control, paired report (train/rl/toy.py)")  # fmt: skip
    toy.add_argument("--workdir", required=True, help="where start/, rl/, control/ go")
    toy.add_argument("--steps", type=int, default=200, help="rollout batches per run")
    toy.add_argument("--questions", type=int, default=32, help="questions per rollout batch")
    toy.add_argument("--start-accuracy", type=float, default=0.3,
                     help="SFT stops once val greedy accuracy reaches this")  # fmt: skip
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--no-control", action="store_true", help="skip the shuffled control")
    toy.add_argument("overrides", nargs="*", help="key=value run config overrides (rl.*, train.*)")
    toy.set_defaults(func=_rl_toy)
    _add_config_command(
        sub, "plan", "compile the real-size train step; per-device memory", "run config YAML",
        _plan,
        ("--devices", {"type": int, "default": None, "help": "fake devices (default: mesh)"}),
    )  # fmt: skip


def _add_pipeline(sub) -> None:
    for name, what in (
        ("generate", "data pipeline 1/3: N reasoning chains per query (resumable shards)"),
        ("assess", "data pipeline 2/3: judge answers, score and bucket the paths"),
        ("agent-chains", "after the reasoning agent's SFT: its own chains for the summary "
         "set (pipeline.agent_reasoner; resumable shards; then rerun build)"),
        ("build", "data pipeline 3/3: reasoning/summary/CoT SFT sets and preference pairs"),
    ):  # fmt: skip
        _add_config_command(sub, name, what, "run config YAML (configs/pipeline/...)", _pipeline)


def _add_eval(sub) -> None:
    _add_config_command(
        sub, "eval", "benchmark evaluation: table, JSON report and chart",
        "eval config YAML (configs/eval/...)", _eval,
    )  # fmt: skip


def _add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="the whole pipeline on the embedded synthetic suite")
    demo.add_argument("--preset", default="tiny",
                      help="tiny | small (configs/demo/) or the path of a preset YAML")  # fmt: skip
    demo.add_argument("--workdir", default="workdir/demo")
    demo.add_argument("--seeds", default=None,
                      help="e.g. 0,1,2: the demo once per seed in <workdir>/seed_<s>, and the "
                      "paper's orderings over them with a CI over questions and seeds")  # fmt: skip
    demo.set_defaults(func=_demo)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # run as the program, not called from Python
        try:
            reexec_with_allocator()
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except InsightVError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
