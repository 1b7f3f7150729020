"""Small tokenizers of both families, trained in-process (no downloads)."""

from __future__ import annotations

import io
import json
from pathlib import Path

CORPUS = [
    "the red square is left of the blue circle. how many circles? answer 3",
    '{"title": "Count the shapes", "content": "red squares: 2, blue circles: 1", '
    '"next_action": "continue"}',
    '{"title": "FINAL ANSWER", "content": "B"} yes no 0 1 2 3 4 5 6 7 8 9 é ü',
    "Perform step-by-step reasoning of the problem. Only provide the reasoning process.",
]

# A terse ChatML-like template: enough structure to exercise multi-turn prompts.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<pad>"]


def byte_bpe(folder: Path, vocab_size: int = 400):
    """A GPT-2 / Llama-3 style byte-level BPE tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIALS,
    )
    tk.train_from_iterator(CORPUS * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|end|>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def sentencepiece(folder: Path, vocab_size: int = 400):
    """A Llama-2 style sentencepiece BPE tokenizer (▁ pieces, byte fallback)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=buf,
        vocab_size=vocab_size,
        byte_fallback=True,
        model_type="bpe",
        character_coverage=1.0,
        user_defined_symbols=SPECIALS,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "chat_template": CHAT_TEMPLATE,
                "eos_token": "<|end|>",
                "pad_token": "<pad>",
            }
        )
    )
    return AutoTokenizer.from_pretrained(str(folder))
