"""Prompts for the three methods and their token ids: the chat template (`chat`), the release's
evaluation string (`paper`) or the release's training string (`release`).

Choices (docs/method.md leaves them open):
  * `chat` and `paper` give ICA the release's *evaluation* form for training and evaluation alike: the
    system text "...based on user historical behavior and preferences.", the task under `***Task***` and
    the full `{ugc}{pairs}{demographics}` block; `release` is the release's training form instead
    (docs/method.md sections 4 and 6b).
  * `none` (the non-personalised DPO baseline) keeps the same framing minus everything personal:
    system "Generate a task-specific response." and the user message without the persona section.
    (The paper's base-model rows are *not* this: they use the ICA prompt with the base model.)
  * PBA's profile, in order of precedence: the `profile` argument (text or a 90-vector), the row's
    golden P~ (`golden_preference`: its `Preference Direction`, else its `profile` field, as P-SOUPS
    rows carry no direction), the release's P~ from the row's history vectors.
  * `release` (docs/method.md section 6b) is the release's *training* input, byte for byte: the
    `paper` template with no BOS; ICA's system "...based on user historical behavior.", the raw task
    (no `**Post:**`), the header `***Historical Behavior***` and UGC + PAIR with no demographics
    (persona variants ugc/pair/demo still select one part); PBA's user text also has no `**Post:**`;
    `none` (which the release does not train) is the same minus the persona section. Its responses
    and length rule are `batching.make_example`'s.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np

from alignx_jax.data import persona as persona_lib
from alignx_jax.errors import DataError

METHODS = ("none", "ica", "pba")
PROMPT_FORMATS = ("chat", "paper", "release")

SYSTEM_ICA = "Generate a task-specific response based on user historical behavior and preferences."
SYSTEM_PBA = "Generate a task-specific response based on user preferences."
SYSTEM_NONE = "Generate a task-specific response."

_TASK = "***Task***\n\n**Post:**\n{prompt}\n\n"
_RESPONSE = "***Response:***\n\n"
ICA_USER = _TASK + "***Historical Behavior and User Preferences***\n\n{persona}\n\n" + _RESPONSE
PBA_USER = _TASK + "***User Preferences***\n\n{profile}\n\n" + _RESPONSE
NONE_USER = _TASK + _RESPONSE

# The release's training strings (docs/method.md section 6b): the raw task, no `**Post:**` line.
RELEASE_SYSTEM_ICA = "Generate a task-specific response based on user historical behavior."
_RELEASE_TASK = "***Task***\n\n{prompt}\n\n"
RELEASE_ICA_USER = _RELEASE_TASK + "***Historical Behavior***\n\n{persona}\n\n" + _RESPONSE
RELEASE_PBA_USER = _RELEASE_TASK + "***User Preferences***\n\n{profile}\n\n" + _RESPONSE
RELEASE_NONE_USER = _RELEASE_TASK + _RESPONSE

# The release's evaluation prompt string (docs/method.md section 7): note the newline after the system
# text and none after the assistant header.
PAPER_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\n{system}\n<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>"
)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise DataError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")


def _check_format(fmt: str) -> None:
    if fmt not in PROMPT_FORMATS:
        raise DataError(f"unknown prompt format {fmt!r}; expected one of {', '.join(PROMPT_FORMATS)}")


def system_message(method: str, fmt: str = "chat") -> str:
    _check_method(method)
    _check_format(fmt)
    if fmt == "release" and method == "ica":
        return RELEASE_SYSTEM_ICA
    return {"none": SYSTEM_NONE, "ica": SYSTEM_ICA, "pba": SYSTEM_PBA}[method]


def golden_preference(
    row: Mapping[str, Any], *, file: str | None = None, index: int | None = None
) -> np.ndarray | str | None:
    """The row's golden P~ (docs/method.md sections 2 and 5): its own `Preference Direction` (float32 [90]),
    else its `profile` text (P-SOUPS carries no direction), else None. The one owner of that order: PBA
    training's 'golden' profile (`resolve_profile`) and `alignx eval --preference golden` both read it."""
    direction = row.get(persona_lib.DIRECTION_FIELD)
    if direction is not None:
        return np.asarray(direction, dtype=np.float32)
    text = persona_lib.row_profile(row, file=file, index=index)  # a blank one is refused, naming the row
    return text if isinstance(text, str) else None


def resolve_profile(row: dict, profile: Any = None) -> str:
    """The PBA profile text for `row` (precedence in the module docstring)."""
    if profile is not None:
        return profile if isinstance(profile, str) else persona_lib.profile_text(np.asarray(profile))
    golden = golden_preference(row)
    if golden is not None:
        return golden if isinstance(golden, str) else persona_lib.profile_text(golden)
    derived = persona_lib.history_direction(row)
    if derived is None:
        raise DataError(
            "PBA needs a profile: the row has no `profile`, no `Preference Direction` and no history vectors"
        )
    return persona_lib.profile_text(derived)


def user_message(
    row: dict,
    *,
    method: str,
    persona: str = "p",
    profile: Any = None,
    rng: np.random.Generator | None = None,
    fmt: str = "chat",
) -> str:
    """The user turn. ICA with `rng` samples the history as the release's training does
    (`persona.sample_history`, over the kinds persona variant `persona` shows); without it the whole history is shown (evaluation).
    fmt='release' gives the release's training text (module docstring); chat and paper share theirs."""
    _check_method(method)
    _check_format(fmt)
    release = fmt == "release"
    if method == "none":
        return (RELEASE_NONE_USER if release else NONE_USER).format(prompt=row["prompt"])
    if method == "pba":
        template = RELEASE_PBA_USER if release else PBA_USER
        return template.format(prompt=row["prompt"], profile=resolve_profile(row, profile))
    ugc = pairs = None
    if rng is not None:
        ugc, pairs = persona_lib.sample_history(row, rng, persona)
    if release and persona == "p":  # the release's ICA training shows UGC + PAIR, no demographics
        row = {**row, persona_lib.DEMO_FIELD: ""}
    block = persona_lib.persona_text(row, persona, ugc=ugc, pairs=pairs)
    return (RELEASE_ICA_USER if release else ICA_USER).format(prompt=row["prompt"], persona=block)


def paper_prompt(system: str, user: str) -> str:
    """The release's evaluation prompt string (BOS not included: it is prepended as an id)."""
    return PAPER_TEMPLATE.format(system=system, user=user)


# the Llama-3 header strings PAPER_TEMPLATE writes as text, each one special token of a Llama-3 tokenizer
HEADER_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# tokenizer -> the HEADER_TOKENS strings it has no one id for (asked once per tokenizer)
_MISSING_HEADERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_WARNED_HEADERS: set[tuple[str, str]] = set()  # (format, tokenizer name): warned once each


def missing_headers(tokenizer: Any) -> tuple[str, ...]:
    """The `HEADER_TOKENS` the paper and release templates write that are no special token of `tokenizer`."""
    try:
        return _MISSING_HEADERS[tokenizer]
    except (KeyError, TypeError):  # TypeError: a tokenizer that takes no weak reference, asked each time
        pass
    missing = tuple(t for t in HEADER_TOKENS if not _is_one_token(tokenizer, t))
    try:
        _MISSING_HEADERS[tokenizer] = missing
    except TypeError:
        pass
    return missing


def _is_one_token(tokenizer: Any, text: str) -> bool:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)  # a word-level vocabulary maps an unknown header to it
    return len(ids) == 1 and (unk is None or int(ids[0]) != unk)


def _warn_headers_as_text(tokenizer: Any, fmt: str) -> None:
    """One warning line per format and tokenizer where the template's headers are no special tokens of
    `tokenizer`: they became ordinary text tokens, silently."""
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    if (fmt, name) in _WARNED_HEADERS:
        return
    missing = missing_headers(tokenizer)
    if not missing:
        return
    _WARNED_HEADERS.add((fmt, name))
    print(
        f"alignx: warning: prompt format {fmt!r} writes Llama-3 headers as text ({', '.join(missing)}) "
        f"that tokenizer {name} has no special tokens for: they become ordinary text tokens; use prompt "
        "format 'chat' (the tokenizer's own template)",
        file=sys.stderr,
    )


def _ids(encoded: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template; 4.x a plain list.
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    return [int(i) for i in encoded]


def prompt_ids(
    tokenizer: Any,
    row: dict,
    *,
    method: str,
    persona: str = "p",
    profile: Any = None,
    fmt: str = "chat",
    rng: np.random.Generator | None = None,
) -> list[int]:
    """Prompt token ids, ending where the response starts.

    chat: the tokenizer's chat template over [system, user] with the generation prompt; a template that
    refuses a system turn (Gemma's raises) gets one user turn, the system text, a blank line, the user text.
    paper: BOS id, then `paper_prompt(...)` tokenized with no special tokens added (the
    special-token strings inside it become their ids), exactly as the release evaluates.
    release: the release's training strings in the same template, tokenized with no special tokens
    added and *no BOS*, exactly as the release trains (docs/method.md section 6b).
    """
    _check_format(fmt)
    system = system_message(method, fmt)
    user = user_message(row, method=method, persona=persona, profile=profile, rng=rng, fmt=fmt)
    if fmt == "chat":
        from jinja2.exceptions import TemplateError

        if getattr(tokenizer, "chat_template", None) is None:  # transformers' own error is a traceback
            raise DataError(
                "prompt format 'chat' needs a tokenizer with a chat template (this one has none: a base "
                "model?); use the paper or release format"
            )
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        try:
            return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        except TemplateError:  # a template with no system role (Gemma's): the system text heads the user turn
            merged = [{"role": "user", "content": f"{system}\n\n{user}"}]
            return _ids(tokenizer.apply_chat_template(merged, add_generation_prompt=True, tokenize=True))
    if fmt == "paper" and tokenizer.bos_token_id is None:
        raise DataError(
            "prompt format 'paper' needs a tokenizer with a BOS token; use the chat or release format"
        )
    _warn_headers_as_text(tokenizer, fmt)
    body = [int(i) for i in tokenizer(paper_prompt(system, user), add_special_tokens=False)["input_ids"]]
    return body if fmt == "release" else [int(tokenizer.bos_token_id)] + body
