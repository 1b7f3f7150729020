"""`insightv <command>`: a thin layer; each command calls one library function.

Bad input ends with `error: <one line>` on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from insightv_jax.errors import InsightVError


def _convert_hf2jax(args: argparse.Namespace) -> None:
    from insightv_jax.checkpoint import atomic_dir, copy_aux_dirs
    from insightv_jax.config import save_yaml, to_dict
    from insightv_jax.hf.convert import import_hf
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
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save((tmp / "params").absolute(), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
            ckptr.wait_until_finished()
    n = sum(x.size for x in __import__("jax").tree.leaves(nnx.state(model, nnx.Param)))
    print(f"converted {src} -> {out} ({cfg.kind}, {n / 1e6:.2f}M params, {time.time() - t0:.1f}s)")


def _convert_jax2hf(args: argparse.Namespace) -> None:
    from insightv_jax.checkpoint import atomic_dir, load_model
    from insightv_jax.hf.convert import export_hf

    t0 = time.time()
    model, cfg, tok_dir, proc_dir = load_model(args.src)
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        export_hf(model, cfg, tmp, tok_dir, proc_dir)
    print(f"exported {args.src} -> {args.out} ({cfg.kind}, {time.time() - t0:.1f}s)")


def _demo(args: argparse.Namespace) -> None:
    print(
        "insightv demo: the end-to-end Insight-V pipeline (synthetic suite -> base VLM -> "
        "data generation -> two agents -> iterative DPO -> evaluation) arrives with the "
        "demo capability; the foundation installed here provides the decoder, HF "
        "conversion and sharding. See README.md for what runs today."
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="insightv", description="Insight-V long-chain visual reasoning in JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True)

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

    demo = sub.add_parser("demo", help="the whole pipeline on the embedded synthetic suite")
    demo.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    demo.add_argument("--workdir", default="workdir/demo")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
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
