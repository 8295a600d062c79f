"""Build the shipped tiny tokenizer: a byte-level BPE with Llama-3-style special tokens.

The corpus is deterministic and offline: the P-SOUPS benchmark file, the 90 preference labels,
the AlignX prompt templates (docs/method.md sections 4, 5, 7), the synthetic world's text
(`alignx_jax.data.synth.world_corpus()` and rendered ICA/PBA prompts of a small synthetic world,
so the demo's prompts are short: sequence length is the main cost on CPU) and template-generated
English. The result is saved as a `transformers` fast-tokenizer folder with a Llama-3 chat template.

    python scripts/build_tokenizer.py --out alignx_jax/assets/tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Iterator

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from a checkout: import the package beside it
    sys.path.insert(0, ROOT)
DEFAULT_PSOUPS = os.path.join(os.path.dirname(ROOT), "shared", "benchmarks", "p-soups", "student_phd.json")
PREFERENCE_SPACE = os.path.join(ROOT, "alignx_jax", "assets", "preference_space.json")

BOS, EOT_TEXT, START_HEADER, END_HEADER, EOT, PAD = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|pad|>",
)
SPECIAL_TOKENS = [BOS, EOT_TEXT, START_HEADER, END_HEADER, EOT, PAD]
VOCAB_SIZE = 4096

# Llama-3's pre-tokenizer split (contractions, words, 1-3 digit numbers, punctuation, spaces).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama-3.1-style chat template: system/user/assistant turns each closed by <|eot_id|>.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif %}"
)

TEMPLATE_TEXTS = [
    "Generate a task-specific response based on user historical behavior and preferences.",
    "Generate a task-specific response based on user historical behavior.",
    "Generate a task-specific response based on user preferences.",
    "***Task***\n\n**Post:**\n",
    "\n\n***Historical Behavior and User Preferences***\n\n",
    "\n\n***User Preferences***\n\n",
    "\n\n***Response:***\n\n",
    "**This person has commented on some posts:**\n\n",
    "**This person has chosen or rejected comments on some posts:**\n\n",
    "*Post:*\n",
    "\n\n*Comment:*\n",
    "\n\n*Chosen:*\n",
    "\n\n*Rejected:*\n",
]

SUBJECTS = [
    "The student",
    "My friend",
    "A scientist",
    "The teacher",
    "Our team",
    "The user",
    "A child",
    "The doctor",
    "This person",
    "The writer",
    "A researcher",
    "The government",
    "My neighbor",
]
VERBS = [
    "explains",
    "describes",
    "asks about",
    "writes about",
    "argues for",
    "learns",
    "enjoys",
    "questions",
    "studies",
    "compares",
    "summarizes",
    "prefers",
    "rejects",
    "discusses",
]
OBJECTS = [
    "the history of science",
    "a simple recipe",
    "climate change",
    "the new law",
    "quantum physics",
    "a funny story",
    "the economy",
    "machine learning",
    "healthy habits",
    "a difficult poem",
    "the solar system",
    "online privacy",
    "music theory",
    "a short trip",
    "public safety",
]
ADVERBS = ["clearly", "briefly", "in detail", "with humor", "carefully", "politely", "directly", "kindly"]
CONNECTIVES = ["because", "although", "so", "while", "and then", "but", "since", "when"]


def _generic_sentences(rng: random.Random, n: int) -> Iterator[str]:
    for _ in range(n):
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ADVERBS)}"
        if rng.random() < 0.5:
            s += f", {rng.choice(CONNECTIVES)} {rng.choice(SUBJECTS).lower()} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
        s += rng.choice([".", "!", "?", "."])
        if rng.random() < 0.2:
            s += f" It costs {rng.randint(0, 9999)} dollars in {rng.randint(1900, 2030)}."
        yield s


def _synthetic_texts(repeats: int = 20, users: int = 24) -> Iterator[str]:
    """The synthetic world's fragments (weighted) and whole rendered prompts of a small world, so
    BPE merges its phrases, post titles and the ICA/PBA prompt scaffolding into few tokens."""
    from alignx_jax.data import prompts, synth

    fragments = synth.world_corpus()
    for _ in range(repeats):
        yield from fragments
    world = synth.generate_world(users, 4, seed=12345)  # a seed the demo and tests do not use
    for row in world.rows:
        for method in ("ica", "pba"):
            yield prompts.user_message(row, method=method)


def corpus(psoups_path: str, seed: int = 0) -> Iterator[str]:
    """Deterministic training texts (same order every run)."""
    if os.path.isfile(psoups_path):
        with open(psoups_path, encoding="utf-8") as f:
            rows = json.load(f)
        for row in rows:
            for key in ("prompt", "chosen", "rejected", "ground_truth_persona", "profile"):
                if isinstance(row.get(key), str):
                    yield row[key]
            for item in row.get("Pair-wise Comparative Feedback") or []:
                for key in ("prompt", "chosen", "rejected"):
                    if isinstance(item.get(key), str):
                        yield item[key]
    with open(PREFERENCE_SPACE, encoding="utf-8") as f:
        dims = json.load(f)["dimensions"]
    labels = [d[k] for d in dims for k in ("positive_label", "negative_label")]
    for _ in range(20):  # labels recur as whole profiles in prompts: give them weight
        yield ", ".join(labels)
    rng = random.Random(seed)
    for _ in range(200):
        yield ", ".join(rng.sample(labels, 8))
    for _ in range(50):
        yield "".join(TEMPLATE_TEXTS)
    yield from _synthetic_texts()
    yield from _generic_sentences(rng, 20000)


def build(out_dir: str, psoups_path: str = DEFAULT_PSOUPS, vocab_size: int = VOCAB_SIZE) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
    )
    tok.train_from_iterator(corpus(psoups_path), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # As in Llama-3: encoding with special tokens prepends BOS only.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    os.makedirs(out_dir, exist_ok=True)
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        additional_special_tokens=[EOT_TEXT, START_HEADER, END_HEADER],
        model_max_length=131072,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(out_dir)
    # Keep the chat template inside tokenizer_config.json and name a class every transformers
    # version knows (4.x reads neither chat_template.jinja nor "TokenizersBackend").
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["add_bos_token"] = True
    if isinstance(cfg.get("extra_special_tokens"), list):  # transformers 5's name; 4.x wants a dict there
        cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens")  # read by both
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    stale = os.path.join(out_dir, "chat_template.jinja")
    if os.path.exists(stale):
        os.remove(stale)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--psoups", default=DEFAULT_PSOUPS)
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = ap.parse_args()
    build(args.out, args.psoups, args.vocab_size)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
