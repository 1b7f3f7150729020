"""`insightv infer`: two-agent answers from checkpoints, for one question or a
JSONL batch (one bad row is reported and skipped; the others still run)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from insightv_jax.checkpoint import agent_prompts
from insightv_jax.errors import DataError, InsightVError
from insightv_jax.hf import load_pretrained
from insightv_jax.sample.prompting import PromptEncoder
from insightv_jax.sample.reasoning import two_agent_answer
from insightv_jax.sample.sampler import Sampler, SamplingParams


@dataclass(frozen=True)
class InferSettings:
    """Two-agent decoding; the defaults are the reference decoding (both agents at
    temperature 0.2, top-p 0.95), the rule `insightv eval` uses by default."""

    reason_temperature: float = 0.2
    summary_temperature: float = 0.2
    top_p: float = 0.95
    reason_max_tokens: int = 256
    summary_max_tokens: int = 64
    batch_size: int = 8
    seed: int = 0

    @classmethod
    def for_decoding(cls, decoding: str, **kw) -> InferSettings:
        """Settings of one decoding rule: `reference` or `greedy`."""
        if decoding == "greedy":
            kw = {"reason_temperature": 0.0, "summary_temperature": 0.0, "top_p": 1.0, **kw}
        elif decoding != "reference":
            raise InsightVError(f"decoding {decoding!r} is not reference or greedy")
        return cls(**kw)


def load_agent(path: str | Path, mesh=None, model=None) -> Sampler:
    """A sampler over a checkpoint (model dir, run dir or HF folder) with its tokenizer,
    its weights restored onto `mesh` (default: the first device). With `model`, that
    checkpoint's model already in memory (e.g. the one an RL update just trained and
    saved at `path`), the sampler decodes with the model's own weights, where they
    are, and reads only the tokenizer and processor from `path`."""
    if model is None:
        model, tokenizer, processor, cfg = load_pretrained(path, mesh)
    else:
        from insightv_jax.checkpoint import aux_dirs, read_model_config
        from insightv_jax.hf import pretrained_aux

        cfg = read_model_config(Path(path))
        tokenizer, processor = pretrained_aux(cfg, *aux_dirs(path))
    if tokenizer is None:
        raise InsightVError(f"{path}: checkpoint has no tokenizer/ (needed to read questions)")
    encoder = PromptEncoder(tokenizer, processor=processor, model_cfg=cfg)
    return Sampler(model, tokenizer, encoder=encoder)


def _check_row(row: dict, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: row is not a JSON object")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: empty question")
    image = row.get("image")
    if image is not None:
        if not isinstance(image, str) or not image:
            raise DataError(f"{where}: image {image!r} is not a path")
        _check_image(Path(image), where)
    return {"id": row.get("id", where), "question": question.strip(), "image": image}


def _check_image(path: Path, where: str) -> None:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"{where}: image {path} not found")
    try:
        with Image.open(path) as im:
            im.load()
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        EOFError,
        Image.DecompressionBombError,
    ) as e:
        raise DataError(f"{where}: image {path} is unreadable ({e.__class__.__name__})") from None


def read_rows(path: Path) -> tuple[list[dict], list[str]]:
    """Valid rows of a JSONL batch file, and one error line per bad row."""
    if not path.is_file():
        raise InsightVError(f"{path}: batch file not found")
    rows, errors = [], []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rows.append(_check_row(json.loads(line), where))
        except json.JSONDecodeError as e:
            errors.append(f"{where}: malformed JSON ({e.msg})")
        except DataError as e:
            errors.append(str(e))
    return rows, errors


def infer(
    reason: str | Path,
    summary: str | Path,
    rows: list[dict],
    settings: InferSettings = InferSettings(),
    progress=None,
    prompts=None,
) -> list[dict]:
    """Two-agent answers for validated rows (`question`, optional `image`), in the
    wording each agent was trained with (its checkpoint's prompts.json) unless
    `prompts` overrides it. Each batch samples with seed `settings.seed` + its index,
    as `insightv eval` does."""
    progress = progress or sys.stderr
    prompts = agent_prompts(prompts, reason, summary)
    reasoner, summarizer = load_agent(reason), load_agent(summary)
    for name, agent in ((reason, reasoner), (summary, summarizer)):
        if any(r["image"] for r in rows) and agent.encoder.model_cfg is None:
            raise InsightVError(f"{name}: a text-only checkpoint cannot take --image")
    rp = SamplingParams(
        temperature=settings.reason_temperature,
        top_p=settings.top_p,
        max_new_tokens=settings.reason_max_tokens,
    )
    sp = SamplingParams(
        temperature=settings.summary_temperature,
        top_p=settings.top_p,
        max_new_tokens=settings.summary_max_tokens,
    )
    results, t0 = [], time.time()
    for start in range(0, len(rows), settings.batch_size):
        chunk = rows[start : start + settings.batch_size]
        seed = settings.seed + start // settings.batch_size
        outs = two_agent_answer(
            reasoner,
            summarizer,
            [r["question"] for r in chunk],
            dataclasses.replace(rp, seed=seed),
            dataclasses.replace(sp, seed=seed),
            prompts,
            images=[[r["image"]] if r["image"] else [] for r in chunk],
        )
        for r, o in zip(chunk, outs):
            results.append({"id": r["id"], **o})
        done = min(start + settings.batch_size, len(rows))
        rate = done / max(time.time() - t0, 1e-9)
        print(f"infer: {done}/{len(rows)} questions ({rate:.2f}/s)", file=progress, flush=True)
    return results
