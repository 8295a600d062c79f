"""A synthetic persona world in the AlignX schema, small enough for a tiny model to learn from.

Each simulated user has a hidden direction over 2-4 of the ten preference dimensions the world
implements (`WORLD_DIMS`: register (Young/Older), extraversion, agreeableness, concise/detailed,
sports, pets, travel, gourmet food, digital technology, humour). A pair is "about" one of the
user's active dimensions: chosen and rejected share a neutral base sentence and differ only in one
appended phrase, the dimension's positive-side phrase versus its negative-side phrase. The pair's
text is a function of (post, dimension) alone, so the same pair recurs across users, and every
dimension's value is split half/half over the users who hold it: as in P-SOUPS, the same pair
carries opposite labels for opposite users and a persona-blind policy sits at about 50%.

History carries the persona:
- UGC items: a post and the user's comment, written with a phrase that shows one active leaning.
- PAIR items: a past pair on one active dimension, labelled by the user.
- Demographic text: reveals about half of the dimensions that have a demographic sentence.
Each history item has its own *noisy* `Preference Direction` (the item's dimension is sometimes
missing or flipped, spurious dimensions are sometimes added), so the release's averaging rule
(docs/method.md section 5) recovers the user's direction only partly, while the item TEXT shows the
true leaning (up to `TEXT_NOISE`): a model that reads the history can beat the rule.

The row's `Preference Direction` is the user's full golden direction (all active dimensions), not
the slice the pair is about: it is then a function of the persona alone, so the PBA preference head
has a learnable target and "golden P̃" means one thing per user (as the paper's PBA-golden row does).

`alignx synth --out DIR --users N --pairs-per-user K --seed S` writes `DIR/data.parquet` (AlignX
fields + `user_id` + `source`) and `DIR/.users.json` (hidden directions; a dot-file because the
data readers take every .json under a folder as rows, and skip dot-files). Same seed, same bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from alignx_jax import paths
from alignx_jax.data.synth_world import BASES, FILLER_DEMOGRAPHICS, POSTS, WORLD, WORLD_DIMS
from alignx_jax.errors import AlignXError, DataError
from alignx_jax.preference_space import NUM_DIMS, load_preference_space

NEUTRAL = 0.5
PAIR_LABEL_NOISE = 0.05  # a user's own choices are not perfectly consistent
TEXT_NOISE = 0.05  # a history text sometimes shows the opposite leaning
VEC_DROP = 0.35  # an item's vector misses the dimension its text shows
VEC_FLIP = 0.20  # ... or states it reversed
VEC_SPURIOUS_WORLD = 0.15  # ... or adds a random world dimension with a random value
VEC_SPURIOUS_OTHER = 0.5  # ... or a random non-world dimension (noise in the profile text)
USERS_FILE = ".users.json"  # dot-file: `alignx data check DIR` must not read it as rows
HISTORY_POOL = 6  # UGC and PAIR items each user has; a row shows some of them:
UGC_PER_ROW = (2, 4)  # (min, max) UGC items per row
PAIR_PER_ROW = (1, 3)  # (min, max) PAIR items per row (fewer: each one holds two responses)


def _u32(*parts: int) -> int:
    """A fixed hash of small ints (Python's hash() is salted per process)."""
    h = 2166136261
    for p in parts:
        for b in int(p).to_bytes(8, "little", signed=True):
            h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def pair_texts(post: int, dim: int) -> tuple[str, str, str]:
    """(prompt, positive-side response, negative-side response) of the pair on world dim `dim`.

    A function of (post, dim) only, so identical pairs recur across users with opposite labels.
    """
    wd = WORLD[dim]
    base = BASES[_u32(post, dim, 1) % len(BASES)]
    pos = wd.pos.response[_u32(post, dim, 2) % len(wd.pos.response)]
    neg = wd.neg.response[_u32(post, dim, 3) % len(wd.neg.response)]
    return POSTS[post], f"{base} {pos}", f"{base} {neg}"


# ------------------------------------------------------------------ text evidence (analysis)


def _count(text: str, phrases: tuple[str, ...]) -> int:
    return sum(text.count(p) for p in phrases)


def response_scores(text: str) -> np.ndarray:
    """Per world dim: (#positive-side response phrases) - (#negative-side ones) in `text`."""
    return np.array([_count(text, d.pos.response) - _count(text, d.neg.response) for d in WORLD], np.float64)


def history_scores(row: dict[str, Any]) -> np.ndarray:
    """Per world dim, the leaning the row's persona TEXT shows (UGC comments, PAIR texts, demographics).

    This is the "keyword count" rule: it reads only text, never an item's direction vector.
    """
    s = np.zeros(len(WORLD), np.float64)
    for item in row.get("User-Generated Content") or []:
        c = item.get("comment", "")
        s += [_count(c, d.pos.comment) - _count(c, d.neg.comment) for d in WORLD]
    for item in row.get("Pair-wise Comparative Feedback") or []:
        s += response_scores(item.get("chosen", "")) - response_scores(item.get("rejected", ""))
    demo = row.get("Demographic Information") or ""
    s += [
        int(bool(d.pos.demographic) and d.pos.demographic in demo)
        - int(bool(d.neg.demographic) and d.neg.demographic in demo)
        for d in WORLD
    ]
    return s


def scores_to_direction(scores_W: np.ndarray) -> np.ndarray:
    """World-dim scores -> a 90-dim direction (sign -> 1 / 0, zero -> neutral)."""
    out = np.full(NUM_DIMS, NEUTRAL)
    for w, d in enumerate(WORLD_DIMS):
        if scores_W[w] > 0:
            out[d] = 1.0
        elif scores_W[w] < 0:
            out[d] = 0.0
    return out


def direction_vote(direction: np.ndarray, chosen: str, rejected: str) -> float:
    """How strongly `direction` prefers `chosen` over `rejected` through the world's response phrases."""
    diff_W = response_scores(chosen) - response_scores(rejected)
    sign_W = np.array([0.0 if direction[d] == NEUTRAL else (2.0 * direction[d] - 1.0) for d in WORLD_DIMS])
    return float(sign_W @ diff_W)


def world_corpus() -> list[str]:
    """Every text fragment the world can emit (for building a tokenizer that covers it)."""
    out = list(POSTS) + list(BASES) + list(FILLER_DEMOGRAPHICS)
    for d in WORLD:
        for side in (d.pos, d.neg):
            out += list(side.response) + list(side.comment) + ([side.demographic] if side.demographic else [])
    return out


# ------------------------------------------------------------------ generation


@dataclass
class User:
    user_id: str
    active: dict[int, int]  # world-dim position -> 0/1
    direction: list[float]  # 90 values in {0, 0.5, 1}
    demographic: str
    ugc: list[dict[str, Any]] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    pair_posts: list[int] = field(default_factory=list)


@dataclass
class World:
    """Rows in the AlignX schema plus, per row, what the generator knows (for analysis)."""

    seed: int
    users: list[User]
    rows: list[dict[str, Any]]
    meta: list[dict[str, Any]]  # per row: user, world dim, post, pos_chosen, label_flipped


def _item_vector(rng: np.random.Generator, w: int, value: int) -> list[float]:
    """The noisy direction vector of a history item whose text shows world dim `w` = `value`."""
    vec = np.full(NUM_DIMS, NEUTRAL)
    u = rng.random()
    if u < VEC_DROP:
        pass  # the item's label misses the dimension its text shows
    elif u < VEC_DROP + VEC_FLIP:
        vec[WORLD_DIMS[w]] = 1.0 - value
    else:
        vec[WORLD_DIMS[w]] = float(value)
    if rng.random() < VEC_SPURIOUS_WORLD:
        other = int(rng.integers(len(WORLD)))
        if other != w:
            vec[WORLD_DIMS[other]] = float(rng.integers(2))
    if rng.random() < VEC_SPURIOUS_OTHER:
        others = [i for i in range(NUM_DIMS) if i not in WORLD_DIMS]
        vec[others[int(rng.integers(len(others)))]] = float(rng.integers(2))
    return [float(x) for x in vec]


def _shown(rng: np.random.Generator, value: int) -> int:
    return value if rng.random() >= TEXT_NOISE else 1 - value


def _make_users(n_users: int, seed: int) -> list[User]:
    rng = np.random.default_rng([seed, 0])
    actives: list[list[int]] = []
    for _ in range(n_users):
        k = int(rng.integers(2, 5))
        actives.append(sorted(int(w) for w in rng.choice(len(WORLD), size=k, replace=False)))
    # Exact balance: for each dim, half the users holding it prefer each side.
    values: list[dict[int, int]] = [{} for _ in range(n_users)]
    for w in range(len(WORLD)):
        holders = [u for u in range(n_users) if w in actives[u]]
        sides = np.arange(len(holders)) % 2
        rng.shuffle(sides)
        for u, v in zip(holders, sides):
            values[u][w] = int(v)
    users = []
    for u in range(n_users):
        urng = np.random.default_rng([seed, 1, u])
        direction = np.full(NUM_DIMS, NEUTRAL)
        for w, v in values[u].items():
            direction[WORLD_DIMS[w]] = float(v)
        demo = []
        for w, v in values[u].items():
            side = WORLD[w].pos if v == 1 else WORLD[w].neg
            if side.demographic and urng.random() < 0.5:
                demo.append(side.demographic)
        if urng.random() < 0.5:
            demo.append(FILLER_DEMOGRAPHICS[int(urng.integers(len(FILLER_DEMOGRAPHICS)))])
        user = User(
            f"synth-{u:06d}", dict(sorted(values[u].items())), [float(x) for x in direction], " ".join(demo)
        )
        dims = list(values[u])
        for i in range(HISTORY_POOL):  # UGC: one comment per item showing one leaning
            w = dims[(i + int(urng.integers(len(dims)))) % len(dims)]
            shown = _shown(urng, values[u][w])
            side = WORLD[w].pos if shown == 1 else WORLD[w].neg
            user.ugc.append(
                {
                    "prompt": POSTS[int(urng.integers(len(POSTS)))],
                    "comment": side.comment[int(urng.integers(len(side.comment)))],
                    "Preference Direction": _item_vector(urng, w, values[u][w]),
                }
            )
        for i in range(HISTORY_POOL):  # PAIR: a past pair on one active dim, labelled by the user
            w = dims[(i + int(urng.integers(len(dims)))) % len(dims)]
            post = int(urng.integers(len(POSTS)))
            prompt, pos, neg = pair_texts(post, w)
            shown = _shown(urng, values[u][w])
            chosen, rejected = (pos, neg) if shown == 1 else (neg, pos)
            user.pairs.append(
                {
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "Preference Direction": _item_vector(urng, w, values[u][w]),
                }
            )
            user.pair_posts.append(post)
        users.append(user)
    return users


def generate_world(n_users: int, pairs_per_user: int, seed: int = 0) -> World:
    """Simulate `n_users` users with `pairs_per_user` rows each (deterministic in `seed`)."""
    if n_users < 2:
        raise AlignXError(f"synth: --users must be at least 2 (got {n_users})")
    if pairs_per_user < 1:
        raise AlignXError(f"synth: --pairs-per-user must be at least 1 (got {pairs_per_user})")
    users = _make_users(n_users, seed)
    rows, meta = [], []
    for u, user in enumerate(users):
        rng = np.random.default_rng([seed, 2, u])
        dims = list(user.active)
        rng.shuffle(dims)
        posts = np.concatenate([rng.permutation(len(POSTS)) for _ in range(pairs_per_user // len(POSTS) + 1)])
        for j in range(pairs_per_user):
            w, post = int(dims[j % len(dims)]), int(posts[j])
            prompt, pos, neg = pair_texts(post, w)
            flipped = bool(rng.random() < PAIR_LABEL_NOISE)
            pos_chosen = (user.active[w] == 1) != flipped
            chosen, rejected = (pos, neg) if pos_chosen else (neg, pos)
            # History: a few items of each kind, never a past pair on this very post.
            n_ugc = int(rng.integers(UGC_PER_ROW[0], UGC_PER_ROW[1] + 1))
            n_pair = int(rng.integers(PAIR_PER_ROW[0], PAIR_PER_ROW[1] + 1))
            ugc_idx = sorted(rng.choice(len(user.ugc), size=n_ugc, replace=False))
            pair_pool = [i for i, p in enumerate(user.pair_posts) if p != post]
            pair_idx = sorted(rng.choice(pair_pool, size=min(n_pair, len(pair_pool)), replace=False))
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "Preference Direction": list(user.direction),
                    "Demographic Information": user.demographic,
                    "User-Generated Content": [dict(user.ugc[i]) for i in ugc_idx],
                    "Pair-wise Comparative Feedback": [dict(user.pairs[i]) for i in pair_idx],
                    "user_id": user.user_id,
                    "source": "synth",
                }
            )
            meta.append(
                {
                    "user": u,
                    "dim": WORLD_DIMS[w],
                    "post": post,
                    "pos_chosen": pos_chosen,
                    "label_flipped": flipped,
                }
            )
    return World(seed, users, rows, meta)


def _arrow_schema():
    import pyarrow as pa

    vec = pa.list_(pa.float64())
    ugc = pa.struct([("prompt", pa.string()), ("comment", pa.string()), ("Preference Direction", vec)])
    pair = pa.struct(
        [
            ("prompt", pa.string()),
            ("chosen", pa.string()),
            ("rejected", pa.string()),
            ("Preference Direction", vec),
        ]
    )
    return pa.schema(
        [
            ("prompt", pa.string()),
            ("chosen", pa.string()),
            ("rejected", pa.string()),
            ("Preference Direction", vec),
            ("Demographic Information", pa.string()),
            ("User-Generated Content", pa.list_(ugc)),
            ("Pair-wise Comparative Feedback", pa.list_(pair)),
            ("user_id", pa.string()),
            ("source", pa.string()),
        ]
    )


def write_world(world: World, out_dir: str) -> dict[str, str]:
    """Write `data.parquet` and `USERS_FILE` under `out_dir`; returns their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _arrow_schema()
    table = pa.Table.from_pylist(world.rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data_path = os.path.join(out_dir, "data.parquet")
    users_path = os.path.join(out_dir, USERS_FILE)
    space = load_preference_space()
    users = (
        json.dumps(
            {
                "about": "Hidden directions of the synthetic users (alignx synth); rows carry user_id.",
                "seed": world.seed,
                "world_dims": [
                    {
                        "index": d.index,
                        "name": d.name,
                        "positive_label": space[d.index]["positive_label"],
                        "negative_label": space[d.index]["negative_label"],
                    }
                    for d in WORLD
                ],
                "users": [
                    {
                        "user_id": u.user_id,
                        "direction": u.direction,
                        "active": {str(WORLD_DIMS[w]): v for w, v in u.active.items()},
                        "Demographic Information": u.demographic,
                    }
                    for u in world.users
                ],
            },
            indent=1,
            sort_keys=False,
        )
        + "\n"
    )
    # the rows and their users' directions renamed into place together: a kill leaves both or neither
    paths.write_all({data_path: buf.getvalue(), users_path: users.encode("utf-8")})
    return {"data": data_path, "users": users_path}


def _refuse_other_data(out: str) -> None:
    """A DataError when OUT holds a data file other than an earlier synth's rows: readers of OUT would read
    it with the synthetic rows as one data set (or, beside a data split's train/ and test/, refuse OUT)."""
    from alignx_jax.data import schema

    if not paths.is_dir(out):
        return
    try:
        files = schema.list_files(out)
    except DataError:  # no data files at all
        return
    own = os.path.join(out, "data.parquet")
    other = [f for f in files if os.path.normpath(f) != os.path.normpath(own)]
    if other:
        raise DataError(
            f"--out holds another data file {other[0]}, which would be read with the synthetic rows as one "
            "data set; choose another --out or remove it",
            file=out,
        )
    if os.path.isfile(own) and not _is_synth_output(out):  # a data set of the user's, not ours to replace
        raise DataError(
            f"--out holds a data file {own} that is not an `alignx synth` output, which this would replace; "
            "choose another --out or remove it",
            file=out,
        )


def _is_synth_output(out: str) -> bool:
    """Whether OUT/data.parquet is an earlier synth's: its users file beside it and the synth's columns."""
    import pyarrow.parquet as pq

    if not os.path.isfile(os.path.join(out, USERS_FILE)):
        return False
    try:
        names = pq.read_schema(os.path.join(out, "data.parquet")).names
    except (OSError, ValueError):  # not a parquet file (pyarrow's ArrowInvalid is a ValueError)
        return False
    return names == _arrow_schema().names


def cli_synth(args: argparse.Namespace) -> int:
    problem = paths.refuse_unwritable("--out", args.out, folder=True)
    if problem:  # before the rows are made: an empty --out was the working directory
        raise AlignXError(problem)
    _refuse_other_data(args.out)
    world = generate_world(args.users, args.pairs_per_user, args.seed)
    written = write_world(world, args.out)
    print(
        f"synth: {len(world.users)} users, {len(world.rows)} rows -> {written['data']} (+ {written['users']})"
    )
    return 0
