"""Convert a public sequential-recommendation dataset (MovieLens, S3Rec-style Amazon) into the
TencentGR layout of docs/DATA_FORMAT.md, split leave-one-out as in docs/BENCHMARKS_PROTOCOL.md.

    python convert_public.py --format movielens --input PATH/ml-100k --out data/ml100k
    python convert_public.py --format s3rec --input PATH/s3rec-Beauty --out data/beauty

Inputs
  movielens: --input is the folder; the variant is recognised by its ratings file:
    u.data + u.item + u.user [+ u.genre]   (100K; tabs / '|', u.item latin-1, 19 genre flags)
    ratings.dat + movies.dat [+ users.dat] (1M, 10M; '::'; 10M has no users.dat)
    ratings.csv + movies.csv               (20M, 25M, latest, latest-small; header line)
  s3rec: --input is <Name>.txt (`user item1 item2 ...` in time order, no timestamps) or a folder
    holding exactly one .txt; <Name>_item2attributes.json beside it is used when present.

Outputs (DIR = --out)
  DIR/train:  seq.jsonl, seq_offsets.pkl, indexer.pkl, item_feat_dict.json
              [creative_emb/emb_81_64.pkl with content on]
  DIR/valid, DIR/test:  predict_seq.jsonl, predict_seq_offsets.pkl, predict_set.jsonl,
                        ground_truth.jsonl
  DIR/dataset_meta.json: source, counts, feature ids, has_timestamps.

Split. Per user, events are sorted stably by (timestamp, original file order). Train holds every
event but the last two; valid's history is the same and its target the second-last event; test's
history adds that event and its target is the last one. Targets are the last / second-last events
whatever their action (with --min_rating a target can be an exposure; BENCHMARKS_PROTOCOL.md's
leave-one-out ignores ratings). Users with fewer than --min_seq_len events (at least 3, which
the split needs) are dropped and counted; the catalogue is every item of the kept events.
Each line ends with one profile record `[u, null, {user feats}, null, null, ts]` whose ts is the
last event's ts + 1 day (+1 position without timestamps); it never reveals the target's time.

Ids. indexer['u'] raw user id str -> re-id, indexer['i'] raw item id int -> re-id (both from 1,
ascending raw id); indexer['f'][fid] raw value -> re-id from 1 (ascending raw value);
indexer['a'] = {1: 1, 0: 2}. Records carry re-ids (valid/test users too: all are known).
ground_truth.jsonl and predict_set.jsonl carry raw ids; retrieval_id = item re-id - 1.
Actions: 1 click for every event; --min_rating R turns MovieLens ratings < R into 0 exposures.

Feature ids (list values are ARRAY features, scalars SPARSE; readers derive the schema from data)
  103 user sparse  age bucket: MovieLens-1M codes 1, 18, 25, 35, 45, 50, 56 (100K ages bucketed)
  104 user sparse  gender 'M' / 'F'
  105 user sparse  occupation (100K: name, 1M: code 0..20)
  109 user sparse  zip prefix: first character (US zip national area; letters = Canada)
  112 item sparse  release year (100K release date, else '(YYYY)' at the end of the title;
                   absent when unknown)
  125 item array   MovieLens genres, S3Rec attributes (categories + brand); absent when none
  S3Rec has no user features (empty profile dict) and no timestamps: ts = 1-based position and
  dataset_meta.json says has_timestamps false, so time features must be off.
  With content on (below) also:
  113 item sparse  MovieLens release decade (1990 for 1990-1999; absent when the year is)
  126 item array   MovieLens tags of ratings.csv-family folders (tags.csv, lower-cased, whitespace collapsed)

Cold items (--cold_items FRAC --seed S). round(FRAC x catalogue size) items are drawn without
replacement, uniformly, by numpy.random.default_rng(S).choice over the catalogue sorted by raw id.
The split is made first, exactly as without the flag; then every event on a cold item leaves the
training lines and the valid/test histories, while targets stay whatever they are (a user whose
target is cold is a cold target). Cold items leave the indexer and item_feat_dict.json too (the
pipeline's unknown-item path: embedded from predict_set features and content vector only); they
stay in predict_set.jsonl after the warm items (retrieval ids from the warm count on), with
feature values the warm vocabulary lacks written as raw-value strings (unknown at inference). The
feature vocabularies are built from the users kept and the warm items. A user whose training line
would hold no event (every event before the valid target, or every event for a user --targets
clicks does not evaluate, is on a cold item) is dropped and counted, as a user too short for the
split is without the flag; --min_seq_len still counts every event, before the draw.

Content (--content; auto = on exactly when --cold_items is): features 113/126 above and one
content vector per catalogue item (warm and cold) with any content, as
train/creative_emb/emb_81_64.pkl ({raw creative id: 64 floats}; feature 81 is read by default).
Tokens by field: MovieLens genre:<name>, year:<YYYY>, decade:<YYY0>, tag:<tag>; S3Rec attr:<id>.
Each token t has a fixed sign vector: entry k is +1 when bit k of SHA-256("content-v1:" + t) is
set (bit k mod 8, least significant first, of digest byte k // 8), else -1. An item's vector is
the sum over its fields of (sum of the field's token vectors / sqrt(token count)),
L2-normalised: each field weighs the same whatever its size, and the vector depends only on the
item's own token names, never on which items exist or on --seed.
"""
import argparse
import bisect
import collections
import contextlib
import csv
import hashlib
import json
import math
import os
import re
import sys
from array import array

import numpy as np
from tqdm import tqdm

from layout import (MAX_ID, ArgumentParser, DataError, DuplicateKey, atomic_write, check_writable, dump_json, dump_pickle,
                    os_error, unique_pairs)

FID_AGE, FID_GENDER, FID_OCC, FID_ZIP, FID_YEAR, FID_TAGS = "103", "104", "105", "109", "112", "125"
FID_DECADE, FID_USER_TAGS = "113", "126"    # written only with content on
FEATURE_NAMES = {FID_AGE: "age_bucket", FID_GENDER: "gender", FID_OCC: "occupation",
                 FID_ZIP: "zip_prefix", FID_YEAR: "release_year", FID_TAGS: "genres_or_attributes",
                 FID_DECADE: "release_decade", FID_USER_TAGS: "user_tags"}
ARRAY_FIDS = (FID_TAGS, FID_USER_TAGS)
# The content vector: feature 81 (training.resolve_mm picks it up by default), 64 values (Beauty's 637
# attributes crowd 32 random directions: the content-only baseline's cold HR@10 is 0.0088 at 32, 0.0103
# at 64, 0.0116 at 256; ml-100k's is the same at 32 and 64; at most 256, one digest). The salt
# is part of the definition: changing it (or the width) changes every vector, so it is versioned.
CONTENT_FID, CONTENT_DIM, CONTENT_SALT = "81", 64, "content-v1:"
CONTENT_FILE = f"train/creative_emb/emb_{CONTENT_FID}_{CONTENT_DIM}.pkl"
AGE_CODES = (1, 18, 25, 35, 45, 50, 56)  # MovieLens-1M's age groups; bucketing a code is a no-op
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western")
NO_GENRES = "(no genres listed)"  # 20M+ placeholder: an absent feature, not a genre
TITLE_YEAR = re.compile(r"\((\d{4})(?:\s*[-\u2013]\s*\d{0,4})?\s*\)\s*$")
DAY = 86400


class Events:
    """Growing columns of (user, item, action, ts) in file order; numpy once parsing ends."""

    def __init__(self):
        self.user, self.item, self.ts = array("q"), array("q"), array("q")
        self.action = array("b")

    def add(self, user, item, action, ts):
        self.user.append(user)
        self.item.append(item)
        self.action.append(action)
        self.ts.append(ts)

    def numpy(self):
        return {k: np.frombuffer(getattr(self, k), dtype=np.int8 if k == "action" else np.int64)
                for k in ("user", "item", "action", "ts")}


_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


def _int(tok, where, what):
    """A decimal integer in [0, 2^63 - 1] (ids and timestamps are stored as int64 and the layout's
    readers refuse negatives). Only ASCII digits: Python's int() would also take '3_0' or
    Arabic-Indic digits and silently read another id."""
    t = tok.strip()
    if not _INT.fullmatch(t):
        raise DataError(f"{where}: {what} {tok!r} is not an integer")
    v = int(t)
    if not 0 <= v <= MAX_ID:
        raise DataError(f"{where}: {what} {tok!r} is out of range, expected a non-negative integer below 2^63")
    return v


def _float(tok, where, what):
    """A finite decimal number (NaN or inf would make every comparison with --min_rating false)."""
    t = tok.strip()
    if not _FLOAT.fullmatch(t):
        raise DataError(f"{where}: {what} {tok!r} is not a finite number")
    v = float(t)
    if not math.isfinite(v):
        raise DataError(f"{where}: {what} {tok!r} is not a finite number")
    return v


def _open_text(path, encoding):
    if os.path.isdir(path):
        raise DataError(f"{path}: a folder, expected a file")
    try:
        return open(path, encoding=encoding, errors="replace")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _lines(path, encoding="utf-8", desc=None, need=None):
    """(where, line) for each non-blank line, where = 'path:lineno'. need: what the file must
    hold (e.g. "ratings"); an empty file is then an error. A file whose last line has no newline
    gets a warning: if it was cut short, that line may be incomplete."""
    seen, last = False, "\n"
    with _open_text(path, encoding) as f:
        for n, line in enumerate(tqdm(f, desc=desc, unit=" lines", disable=desc is None or
                                      not sys.stderr.isatty()), 1):
            last = line
            line = line.rstrip("\r\n")
            if line.strip():
                seen = True
                yield f"{path}:{n}", line
    if need and not seen:
        raise DataError(f"{path}: empty file, expected {need}")
    if not last.endswith("\n") and last.strip():
        print(f"warning: {path}:{n}: the file ends without a newline; if it was cut short, this last line "
              f"is incomplete", file=sys.stderr)


def _once(table, key, where, what):
    """Refuse a second definition of the same item or user: the last one would silently win."""
    if key in table:
        raise DataError(f"{where}: {what} {key} already defined on an earlier line, expected one line per {what}")


def _split(where, line, sep, n, what):
    parts = line.split(sep)
    if len(parts) != n:
        raise DataError(f"{where}: expected {n} {sep!r}-separated fields ({what}), "
                        f"got {len(parts)}")
    return parts


def age_bucket(age):
    return max(c for c in AGE_CODES if c <= age) if age >= AGE_CODES[0] else AGE_CODES[0]


def _user_feats(age, gender, occupation, zip_code, where):
    feats = {}
    if age.strip():
        feats[FID_AGE] = age_bucket(_int(age, where, "age"))
    for fid, v in ((FID_GENDER, gender.strip()), (FID_OCC, occupation.strip()),
                   (FID_ZIP, zip_code.strip()[:1])):
        if v:
            feats[fid] = v
    return feats


def _item_feats(year, genres):
    feats = {}
    if year is not None:
        feats[FID_YEAR] = year
    genres = list(dict.fromkeys(g for g in genres if g and g != NO_GENRES))
    if genres:
        feats[FID_TAGS] = genres
    return feats


def _title_year(title):
    m = TITLE_YEAR.search(title)
    return int(m.group(1)) if m else None


def _action(rating, min_rating):
    return 0 if min_rating is not None and rating < min_rating else 1


# ---------------------------------------------------------------------------------------------
# Readers: each returns (Events, item_meta {raw item: feats}, user_meta {raw user: feats}, info)
# ---------------------------------------------------------------------------------------------

def _need(folder, name, why):
    path = os.path.join(folder, name)
    if os.path.isdir(path):
        raise DataError(f"{path}: a folder, expected a file; {why}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing; {why}")
    return path


def _read_ml100k(folder, min_rating):
    ev = Events()
    for where, line in _lines(os.path.join(folder, "u.data"), desc="u.data",
                              need="tab-separated lines user, item, rating, timestamp"):
        u, i, r, t = _split(where, line, "\t", 4, "user, item, rating, timestamp")
        ev.add(_int(u, where, "user id"), _int(i, where, "item id"),
               _action(_float(r, where, "rating"), min_rating), _int(t, where, "timestamp"))
    genres = ML100K_GENRES
    if os.path.isfile(os.path.join(folder, "u.genre")):
        genres = tuple(_split(w, ln, "|", 2, "genre, index")[0]
                       for w, ln in _lines(os.path.join(folder, "u.genre"), "latin-1"))
    items = {}
    path = _need(folder, "u.item", "the 100K variant needs u.item next to u.data")
    for where, line in _lines(path, "latin-1"):
        f = _split(where, line, "|", 5 + len(genres),
                   f"id, title, release date, video date, url, {len(genres)} genre flags")
        if any(x not in ("0", "1") for x in f[5:]):
            raise DataError(f"{where}: genre flags must be 0 or 1, got {'|'.join(f[5:])!r}")
        date = f[2].strip()
        year = _int(date[-4:], where, "release year") if date else _title_year(f[1])
        iid = _int(f[0], where, "item id")
        _once(items, iid, where, "item")
        items[iid] = _item_feats(
            year, [g for g, flag in zip(genres, f[5:]) if flag == "1"])
    users = {}
    path = _need(folder, "u.user", "the 100K variant needs u.user next to u.data")
    for where, line in _lines(path, "latin-1"):
        uid, age, gender, occ, zip_code = _split(where, line, "|", 5,
                                                 "id, age, gender, occupation, zip")
        uid = _int(uid, where, "user id")
        _once(users, uid, where, "user")
        users[uid] = _user_feats(age, gender, occ, zip_code, where)
    return ev, items, users, {"variant": "ml-100k (u.data)"}


def _read_ml_dat(folder, min_rating):
    ev = Events()
    for where, line in _lines(os.path.join(folder, "ratings.dat"), desc="ratings.dat",
                              need="lines UserID::MovieID::Rating::Timestamp"):
        u, i, r, t = _split(where, line, "::", 4, "UserID::MovieID::Rating::Timestamp")
        ev.add(_int(u, where, "user id"), _int(i, where, "item id"),
               _action(_float(r, where, "rating"), min_rating), _int(t, where, "timestamp"))
    items = {}
    path = _need(folder, "movies.dat", "ratings.dat needs movies.dat beside it")
    # 1M is latin-1, 10M utf-8; only ASCII parts (id, year, genres) are used, latin-1 never fails
    for where, line in _lines(path, "latin-1"):
        parts = line.split("::")
        if len(parts) < 3:
            raise DataError(f"{where}: expected MovieID::Title::Genres")
        iid = _int(parts[0], where, "item id")
        _once(items, iid, where, "item")
        items[iid] = _item_feats(_title_year("::".join(parts[1:-1])), parts[-1].split("|"))
    users = {}
    path = os.path.join(folder, "users.dat")
    if os.path.isfile(path):
        for where, line in _lines(path, "latin-1"):
            uid, gender, age, occ, zip_code = _split(
                where, line, "::", 5, "UserID::Gender::Age::Occupation::Zip-code")
            feats = _user_feats(age, gender, occ, zip_code, where)
            if FID_OCC in feats:
                feats[FID_OCC] = _int(feats[FID_OCC], where, "occupation code")
            uid = _int(uid, where, "user id")
            _once(users, uid, where, "user")
            users[uid] = feats
    else:
        print(f"notice: {path} not found (as in ML-10M): no user features")
    return ev, items, users, {"variant": "ml-1m/10m (ratings.dat)"}


def _csv_columns(where, header, names):
    try:
        return [header.index(n) for n in names]
    except ValueError:
        raise DataError(f"{where}: expected a header line with columns {', '.join(names)}, "
                        f"got {','.join(header)!r}") from None


def _read_ml_csv(folder, min_rating):
    ev = Events()
    path = os.path.join(folder, "ratings.csv")
    cols = None
    for where, line in _lines(path, desc="ratings.csv", need="a header line and rating lines"):
        f = line.split(",")
        if cols is None:
            cols = _csv_columns(where, f, ["userId", "movieId", "rating", "timestamp"])
            continue
        if len(f) <= max(cols):
            raise DataError(f"{where}: expected userId,movieId,rating,timestamp, got {line!r}")
        u, i, r, t = (f[c] for c in cols)
        ev.add(_int(u, where, "user id"), _int(i, where, "item id"),
               _action(_float(r, where, "rating"), min_rating), _int(t, where, "timestamp"))
    if cols is not None and not len(ev.user):
        raise DataError(f"{path}: only a header line, expected rating lines after it")
    items = {}
    path = _need(folder, "movies.csv", "ratings.csv needs movies.csv beside it")
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        rows = csv.reader(fh, strict=True)
        try:
            cols = _csv_columns(f"{path}:1", next(rows, []), ["movieId", "title", "genres"])
            for row in rows:
                where = f"{path}:{rows.line_num}"
                if not row:
                    continue
                if len(row) <= max(cols):
                    raise DataError(f"{where}: expected movieId,title,genres, got {row!r}")
                mid, title, genres = (row[c] for c in cols)
                iid = _int(mid, where, "movie id")
                _once(items, iid, where, "item")
                items[iid] = _item_feats(_title_year(title), genres.split("|"))
        except csv.Error as e:
            raise DataError(f"{path}:{rows.line_num}: not valid CSV ({e}); is the file cut short?") from None
    return ev, items, {}, {"variant": "ml-20m/25m/latest (ratings.csv)"}


def read_movielens(folder, min_rating=None):
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: not a folder; --format movielens takes the dataset folder")
    for name, reader in (("u.data", _read_ml100k), ("ratings.dat", _read_ml_dat),
                         ("ratings.csv", _read_ml_csv)):
        if os.path.isfile(os.path.join(folder, name)):
            return reader(folder, min_rating)
    raise DataError(f"{folder}: no MovieLens ratings file (looked for u.data, ratings.dat, "
                    f"ratings.csv)")


def read_ml_tags(folder):
    """{raw item id: sorted distinct tags} from a ratings.csv-family folder's tags.csv
    (userId,movieId,tag,timestamp); {} when the folder has none. A tag is lower-cased with its
    whitespace collapsed, so "Sci-Fi " and "sci-fi" are one tag."""
    path = os.path.join(folder, "tags.csv")
    if not os.path.isfile(path):
        return {}
    tags = collections.defaultdict(set)
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        rows = csv.reader(fh, strict=True)
        try:
            cols = _csv_columns(f"{path}:1", next(rows, []), ["movieId", "tag"])
            for row in rows:
                if not row:
                    continue
                where = f"{path}:{rows.line_num}"
                if len(row) <= max(cols):
                    raise DataError(f"{where}: expected userId,movieId,tag,timestamp, got {row!r}")
                tag = " ".join(row[cols[1]].split()).lower()
                if tag:
                    tags[_int(row[cols[0]], where, "movie id")].add(tag)
        except csv.Error as e:
            raise DataError(f"{path}:{rows.line_num}: not valid CSV ({e}); is the file cut short?") from None
    return {i: sorted(t) for i, t in tags.items()}


def read_s3rec(path):
    if os.path.isdir(path):
        txts = sorted(n for n in os.listdir(path) if n.endswith(".txt"))
        if len(txts) != 1:
            raise DataError(f"{path}: expected exactly one <Name>.txt in the folder, found "
                            f"{len(txts)} ({', '.join(txts) or 'none'}); pass the .txt file")
        path = os.path.join(path, txts[0])
    if not os.path.isfile(path):
        raise DataError(f"{path}: not found; --format s3rec takes <Name>.txt or its folder")
    ev, seen = Events(), {}
    for where, line in _lines(path, desc=os.path.basename(path), need="lines `user item1 item2 ...`"):
        toks = line.split()
        user = _int(toks[0], where, "user id")
        if user in seen:
            raise DataError(f"{where}: user {user} already has a line ({seen[user]}); "
                            f"expected one line per user")
        seen[user] = where
        for pos, tok in enumerate(toks[1:], 1):
            ev.add(user, _int(tok, where, "item id"), 1, pos)
    items = {}
    attr_path = path[:-len(".txt")] + "_item2attributes.json" if path.endswith(".txt") else ""
    if attr_path and os.path.isdir(attr_path):
        raise DataError(f"{attr_path}: a folder, expected the JSON file {{item id: [attribute ids]}}")
    if os.path.isfile(attr_path):
        try:
            with open(attr_path, encoding="utf-8") as f:
                attrs = json.load(f, object_pairs_hook=unique_pairs)
        except DuplicateKey as e:
            raise DataError(f"{attr_path}: key {json.dumps(e.args[0])} appears twice in one object, expected "
                            f"each item once") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{attr_path}:{e.lineno}: not valid JSON ({e.msg})") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{attr_path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except RecursionError:
            raise DataError(f"{attr_path}: JSON nested too deeply") from None
        except OSError as e:
            raise DataError(f"{attr_path}: cannot read ({e.strerror})") from None
        if not isinstance(attrs, dict):
            raise DataError(f"{attr_path}:1: expected an object {{item id: [attribute ids]}}")
        for k, v in attrs.items():
            if not isinstance(v, list) or not all(type(a) is int for a in v):
                raise DataError(f"{attr_path}: item {k!r}: expected a list of integer attribute "
                                f"ids, got {str(v)[:60]}")
            items[_int(k, attr_path, "item id key")] = _item_feats(None, v)
    else:
        print(f"notice: {attr_path or path}: no <Name>_item2attributes.json; no item features")
    return ev, items, {}, {"variant": os.path.basename(path), "attributes_file":
                           os.path.basename(attr_path) if os.path.isfile(attr_path) else None}


# ---------------------------------------------------------------------------------------------
# Content: extra item features and the fixed content vector
# ---------------------------------------------------------------------------------------------

def with_content_feats(item_meta, tags):
    """item_meta plus the content-only features: the decade of a release year, and tags."""
    out = {}
    for i in set(item_meta) | set(tags):
        f = dict(item_meta.get(i, {}))
        if FID_YEAR in f:
            f[FID_DECADE] = f[FID_YEAR] // 10 * 10
        if tags.get(i):
            f[FID_USER_TAGS] = list(tags[i])
        out[i] = f
    return out


def content_fields(fmt, feats):
    """{field: [token]} of one item's raw features. Tokens are names (a genre's, an attribute
    id's), never positions in a vocabulary, so a vector does not depend on which items exist."""
    fields = {}
    if fmt == "s3rec":
        if feats.get(FID_TAGS):
            fields["attr"] = [f"attr:{a}" for a in feats[FID_TAGS]]
        return fields
    if feats.get(FID_TAGS):
        fields["genre"] = [f"genre:{g}" for g in feats[FID_TAGS]]
    if FID_YEAR in feats:
        fields["year"] = [f"year:{feats[FID_YEAR]}"]
        fields["decade"] = [f"decade:{feats[FID_YEAR] // 10 * 10}"]
    if feats.get(FID_USER_TAGS):
        fields["tag"] = [f"tag:{t}" for t in feats[FID_USER_TAGS]]
    return fields


def token_signs(token, cache=None):
    """The token's fixed +-1 vector: entry k is +1 when bit k (little-endian within each byte) of
    SHA-256(CONTENT_SALT + token) is set. A hash, not a random generator: the same on any numpy."""
    if cache is not None and token in cache:
        return cache[token]
    bits = np.unpackbits(np.frombuffer(hashlib.sha256((CONTENT_SALT + token).encode("utf-8")).digest(),
                                       np.uint8), bitorder="little")[:CONTENT_DIM]
    v = bits.astype(np.float64) * 2 - 1
    if cache is not None:
        cache[token] = v
    return v


def content_vector(fields, cache=None):
    """Sum over fields of (sum of the field's token vectors / sqrt(its token count)), L2-normalised;
    None for an item without tokens (no vector: the reader marks it missing)."""
    v = np.zeros(CONTENT_DIM)
    for tokens in fields.values():
        if tokens:
            v += sum(token_signs(t, cache) for t in tokens) / math.sqrt(len(tokens))
    norm = np.linalg.norm(v)
    return None if norm == 0 else (v / norm).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------

def _reindex(values):
    return {v: k for k, v in enumerate(sorted(values, key=lambda x: (type(x).__name__, x)), 1)}


def _map_feats(feats, fmap):
    return {fid: [fmap[fid][x] for x in v] if isinstance(v, list) else fmap[fid][v]
            for fid, v in sorted(feats.items())}


def _map_feats_cold(feats, fmap):
    """A cold item's features: a value the warm items' vocabulary lacks is written as its raw
    value's string, which readers take for an unseen value (unknown), as at inference."""
    def one(fid, x):
        r = fmap.get(fid, {}).get(x)
        return str(x) if r is None else r
    return {fid: [one(fid, x) for x in v] if isinstance(v, list) else one(fid, v)
            for fid, v in sorted(feats.items())}


def _dumps(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _write_jsonl(path, lines):
    """Write lines (str) to path atomically; return the byte offset of each line."""
    offsets, pos = [], 0
    with atomic_write(path, "wb") as f:
        for line in lines:
            b = (line + "\n").encode("utf-8")
            offsets.append(pos)
            f.write(b)
            pos += len(b)
    return offsets


OUTPUTS = ("train/seq.jsonl", "train/seq_offsets.pkl", "train/indexer.pkl", "train/item_feat_dict.json",
           *(f"{s}/{n}" for s in ("valid", "test")
             for n in ("predict_seq.jsonl", "predict_seq_offsets.pkl", "predict_set.jsonl", "ground_truth.jsonl")),
           CONTENT_FILE)


def check_output(out):
    """Before any work: --out is a folder we can write, and it holds no data this script did not
    make (a TencentGR folder's seq.jsonl would be overwritten). A folder whose dataset_meta.json
    was written by this script (complete, or marked incomplete by an interrupted run) may be
    converted into again."""
    meta_path = os.path.join(out, "dataset_meta.json")
    ours = False
    if os.path.isfile(meta_path):
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError):
            meta = None
        ours = isinstance(meta, dict) and (meta.get("incomplete") is True or {"format", "split"} <= meta.keys())
    if not ours:
        found = [p for p in OUTPUTS if os.path.exists(os.path.join(out, p))]
        if found:
            raise DataError(f"{os.path.join(out, found[0])}: exists and was not written by convert_public.py (no "
                            f"dataset_meta.json of ours in {out}); refusing to overwrite it, choose another --out")
    check_writable(out, "--out")


def _mark_incomplete(out, fmt):
    """dataset_meta.json says "incomplete" while the outputs are written: an interrupted run (a
    full disk, a kill) leaves a mix of new and old files that no reader takes for a finished
    conversion, and that a rerun may overwrite."""
    dump_json({"format": fmt, "incomplete": True, "has_timestamps": fmt != "s3rec",
               "note": "conversion started and did not finish; rerun convert_public.py"},
              os.path.join(out, "dataset_meta.json"), indent=1)


def convert(fmt, input_path, out, min_rating=None, min_seq_len=3, targets="last", cold_items=0.0, seed=0,
            content="auto"):
    """Convert `input_path` (format 'movielens' or 's3rec') into the layout under `out`.

    targets "last": the benchmark protocol's leave-one-out (valid target = second-last event,
    test target = last, of any action). targets "clicks": the TencentGR task's kind of target,
    a click: test target = the user's last click, valid target = the click before it, train =
    every event before the valid target; users without two such clicks are not evaluated and
    train on all their events. cold_items (a share in [0, 1), 0 = none), seed and content
    ('auto', 'on', 'off'): the cold-item protocol and content features of the module docstring.
    Returns the dict written to out/dataset_meta.json.
    """
    if targets not in ("last", "clicks"):
        raise DataError(f"--targets {targets!r}: expected last or clicks")
    if min_seq_len < 3:
        raise DataError(f"--min_seq_len {min_seq_len}: must be at least 3 (train, valid and test "
                        f"each need an event)")
    if min_rating is not None and not math.isfinite(min_rating):
        raise DataError(f"--min_rating {min_rating}: expected a finite number")
    if not (math.isfinite(cold_items) and 0 <= cold_items < 1):
        raise DataError(f"--cold_items {cold_items}: expected a share of the items >= 0 and < 1 (0: no cold items)")
    if type(seed) is not int or seed < 0:
        raise DataError(f"--seed {seed}: expected a non-negative integer")
    if content not in ("auto", "on", "off"):
        raise DataError(f"--content {content!r}: expected auto, on or off")
    use_content = content == "on" or (content == "auto" and cold_items > 0)
    check_output(out)
    if fmt == "movielens":
        ev, item_meta, user_meta, info = read_movielens(input_path, min_rating)
        has_ts = True
    elif fmt == "s3rec":
        if min_rating is not None:
            raise DataError("--min_rating: S3Rec files hold no ratings; drop the flag")
        ev, item_meta, user_meta, info = read_s3rec(input_path)
        has_ts = False
    else:
        raise DataError(f"--format {fmt!r}: expected movielens or s3rec")
    meta_items, tags = set(item_meta), {}
    if use_content:
        tags = read_ml_tags(input_path) if info["variant"].endswith("(ratings.csv)") else {}
        item_meta = with_content_feats(item_meta, tags)
    cols = ev.numpy()
    if len(cols["user"]) == 0:
        raise DataError(f"{input_path}: no interactions found")

    # stable (user, ts, file order): two stable passes, least significant key first
    order = np.argsort(cols["ts"], kind="stable")
    order = order[np.argsort(cols["user"][order], kind="stable")]
    users_all, starts, counts = np.unique(cols["user"][order], return_index=True,
                                         return_counts=True)
    keep = counts >= min_seq_len
    users_dropped, events_dropped = int((~keep).sum()), int(counts[~keep].sum())
    users, starts, counts = users_all[keep], starts[keep], counts[keep]
    if len(users) == 0:
        raise DataError(f"{input_path}: no user has {min_seq_len} or more events")
    kept = np.concatenate([order[s:s + c] for s, c in zip(starts, counts)])
    catalogue = np.unique(cols["item"][kept])

    n_items = len(catalogue)
    cold = np.zeros(n_items, bool)
    if cold_items > 0:
        n_cold = int(math.floor(cold_items * n_items + 0.5))
        if not 1 <= n_cold < n_items:
            raise DataError(f"--cold_items {cold_items}: {n_cold} of the {n_items} items would be cold, expected at "
                            f"least one cold and one warm item")
        cold[np.random.default_rng(seed).choice(n_items, n_cold, replace=False)] = True
    any_cold = bool(cold.any())
    warm_items, cold_items_raw = catalogue[~cold].tolist(), catalogue[cold].tolist()
    pos = np.minimum(np.searchsorted(catalogue, cols["item"]), n_items - 1)
    reid = np.zeros(n_items, np.int64)
    reid[~cold] = np.arange(1, len(warm_items) + 1)
    step = DAY if has_ts else 1
    # Python lists: per-record indexing of numpy scalars is several times slower. Events of
    # dropped users map to arbitrary rows and are never read.
    item_re, item_raw = reid[pos].tolist(), cols["item"].tolist()
    action, ts = cols["action"].tolist(), cols["ts"].tolist()
    ev_cold = cold[pos].tolist() if any_cold else None

    # (raw user, history event indices, (valid, test) cut positions in them, (valid, test) target events)
    per_user, cold_dropped, cold_dropped_events, cold_dropped_clicks, cold_events = [], 0, 0, 0, 0
    for u, s, c in zip(users.tolist(), starts.tolist(), counts.tolist()):
        idx = order[s:s + c].tolist()
        if targets == "last":
            cuts = (c - 2, c - 1)
        else:
            clicks = [j for j in range(1, c) if action[idx[j]] >= 1]
            cuts = (clicks[-2], clicks[-1]) if len(clicks) >= 2 else None
        tgts = (idx[cuts[0]], idx[cuts[1]]) if cuts else None
        if any_cold:
            warm_pos = [p for p, j in enumerate(idx) if not ev_cold[j]]
            hcuts = tuple(bisect.bisect_left(warm_pos, x) for x in cuts) if cuts else None
            if (hcuts[0] if cuts else len(warm_pos)) == 0:      # its training line would be empty
                cold_dropped, cold_dropped_events = cold_dropped + 1, cold_dropped_events + c
                cold_dropped_clicks += sum(action[j] for j in idx)
                continue
            cold_events += c - len(warm_pos)
            idx, cuts = [idx[p] for p in warm_pos], hcuts
        per_user.append((u, idx, cuts, tgts))
    if not per_user:
        raise DataError(f"{input_path}: every user's history before its targets is on cold items; lower --cold_items")

    indexer_u = {str(u): k for k, (u, *_) in enumerate(per_user, 1)}
    indexer_i = {i: k for k, i in enumerate(warm_items, 1)}
    raw_values = collections.defaultdict(set)
    for meta in [user_meta.get(u, {}) for u, *_ in per_user] + \
                [item_meta.get(i, {}) for i in warm_items]:
        for fid, v in meta.items():
            raw_values[fid].update(v if isinstance(v, list) else [v])
    fmap = collections.defaultdict(dict)
    for fid in sorted(raw_values):
        fmap[fid] = _reindex(raw_values[fid])
    item_feats = [_map_feats(item_meta.get(i, {}), fmap) for i in warm_items]
    cold_feats = [_map_feats_cold(item_meta.get(i, {}), fmap) for i in cold_items_raw]
    item_json = [_dumps(f) for f in item_feats]

    def line(ureid, idx, profile):
        recs = [f"[{ureid},{item_re[j]},null,{item_json[item_re[j] - 1]},{action[j]},{ts[j]}]"
                for j in idx]
        recs.append(f"[{ureid},null,{profile},null,null,{ts[idx[-1]] + step}]")
        return "[" + ",".join(recs) + "]"

    per_user = [(k, str(u), idx, _dumps(_map_feats(user_meta.get(u, {}), fmap)), cuts, tgts)
                for k, (u, idx, cuts, tgts) in enumerate(per_user, 1)]
    evaluated = [p for p in per_user if p[4] is not None]
    if not evaluated:
        raise DataError(f"{input_path}: no user has two clicks after a first event, so none can be evaluated "
                        f"(--targets clicks); lower --min_rating or use --targets last")
    bar = dict(unit=" users", disable=not sys.stderr.isatty())

    _mark_incomplete(out, fmt)
    train = os.path.join(out, "train")
    offs = _write_jsonl(os.path.join(train, "seq.jsonl"),
                        (line(k, idx[:cuts[0]] if cuts else idx, prof) for k, _, idx, prof, cuts, _ in
                         tqdm(per_user, desc="train", **bar)))
    dump_pickle(offs, os.path.join(train, "seq_offsets.pkl"))
    dump_pickle({"u": indexer_u, "i": indexer_i, "f": fmap, "a": {1: 1, 0: 2}},
                os.path.join(train, "indexer.pkl"))
    dump_json({str(k): f for k, f in enumerate(item_feats, 1)},
              os.path.join(train, "item_feat_dict.json"), separators=(",", ":"))
    # warm items by re-id (retrieval id = re-id - 1), then cold ones by raw id
    predict_set = [_dumps({"creative_id": i, "retrieval_id": k, "features": f})
                   for k, (i, f) in enumerate(zip(warm_items + cold_items_raw, item_feats + cold_feats))]
    for split, which in (("valid", 0), ("test", 1)):
        d = os.path.join(out, split)
        offs = _write_jsonl(os.path.join(d, "predict_seq.jsonl"),
                            (line(k, idx[:cuts[which]], prof) for k, _, idx, prof, cuts, _ in
                             tqdm(evaluated, desc=split, **bar)))
        dump_pickle(offs, os.path.join(d, "predict_seq_offsets.pkl"))
        _write_jsonl(os.path.join(d, "predict_set.jsonl"), predict_set)
        _write_jsonl(os.path.join(d, "ground_truth.jsonl"),
                     (_dumps({"user_id": raw, "creative_id": item_raw[tgts[which]]})
                      for _, raw, _, _, _, tgts in evaluated))
    content_path = os.path.join(out, CONTENT_FILE)
    vectors = {}
    if use_content:
        cache = {}
        for i in catalogue.tolist():
            v = content_vector(content_fields(fmt, item_meta.get(i, {})), cache)
            if v is not None:
                vectors[i] = v.tolist()     # plain floats: the pickle does not depend on numpy's version
        dump_pickle(vectors, content_path)
    elif os.path.isfile(content_path):      # left by an earlier conversion into this folder
        os.remove(content_path)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(content_path))

    n_kept = int(counts.sum()) - cold_dropped_events
    clicks = int(cols["action"][kept].sum()) - cold_dropped_clicks
    groups = {"user_sparse": [], "user_array": [], "item_sparse": [], "item_array": []}
    for fid in sorted(fmap):
        side = "user" if fid in (FID_AGE, FID_GENDER, FID_OCC, FID_ZIP) else "item"
        groups[f"{side}_{'array' if fid in ARRAY_FIDS else 'sparse'}"].append(fid)
    meta = {
        "format": fmt, **info, "source": os.path.abspath(input_path),
        "has_timestamps": has_ts,
        "timestamp_unit": "unix seconds" if has_ts else "position (1-based)",
        "profile_ts": f"last history ts + {step}",
        "min_rating": min_rating, "min_seq_len": min_seq_len,
        "targets": targets,
        "split": ("leave-one-out on stable (ts, file order) sort: train = all but last 2, "
                  "valid target = second-last, test target = last (targets of any action)") if targets == "last" else
                 ("on stable (ts, file order) sort: test target = last click, valid target = the click before it, "
                  "train = events before the valid target; users without two clicks after a first event train on "
                  "everything and are not evaluated"),
        "counts": {"users": len(per_user), "items": n_items, "events": n_kept, "evaluated_users": len(evaluated),
                   "train_events": sum(cuts[0] if cuts else len(idx) for _, _, idx, _, cuts, _ in per_user),
                   "clicks": clicks,
                   "exposures": n_kept - clicks, "users_dropped": users_dropped,
                   "events_dropped": events_dropped,
                   "items_without_features": sum(not f for f in item_feats + cold_feats),
                   "metadata_items_never_interacted": len(meta_items - set(catalogue.tolist()))},
        "feature_ids": groups,
        "feature_names": {fid: FEATURE_NAMES[fid] for fid in sorted(fmap)},
        "feature_cardinality": {fid: len(fmap[fid]) for fid in sorted(fmap)},
    }
    if any_cold:
        cold_set = set(cold_items_raw)
        meta["cold_items"] = {
            "share": cold_items, "seed": seed,
            "selection": f"numpy.random.default_rng({seed}).choice(catalogue sorted by raw id, "
                         f"round({cold_items} x {n_items}), replace=False)",
            "rule": "split as without cold items; events on cold items leave train lines and valid/test histories, "
                    "targets stay; cold items are not in the indexer; users whose training line would be empty are "
                    "dropped",
            "items": len(cold_items_raw), "candidates": n_items,
            "share_of_candidates": round(len(cold_items_raw) / n_items, 6),
            "events_on_cold_items": cold_events,
            "users_dropped": cold_dropped, "events_of_users_dropped": cold_dropped_events,
            "valid_cold_targets": sum(item_raw[t[0]] in cold_set for *_, t in evaluated),
            "test_cold_targets": sum(item_raw[t[1]] in cold_set for *_, t in evaluated),
        }
    if use_content:
        meta["content"] = {
            "file": CONTENT_FILE, "feature_id": CONTENT_FID, "dim": CONTENT_DIM, "salt": CONTENT_SALT,
            "tokens": "s3rec attr:<id>" if fmt == "s3rec" else "genre:<name>, year:<YYYY>, decade:<YYY0>, tag:<tag>",
            "vector": "sum over fields of (sum of +-1 token vectors / sqrt(field token count)), L2-normalised; "
                      "entry k of a token's vector = +1 if bit k of sha256(salt + token) else -1",
            "items_with_vector": len(vectors), "items_without_content": n_items - len(vectors),
            "tags_file": "tags.csv" if tags else None,
        }
    dump_json(meta, os.path.join(out, "dataset_meta.json"), indent=1)
    return meta


def parser() -> argparse.ArgumentParser:
    """The command line (docs/FLAGS.md is generated from it)."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=["movielens", "s3rec"],
                   help="input family: MovieLens folder or S3Rec <Name>.txt")
    p.add_argument("--input", required=True,
                   help="MovieLens folder; S3Rec <Name>.txt or a folder holding exactly one .txt")
    p.add_argument("--out", required=True, help="output folder; gets train/, valid/, test/ and "
                                                "dataset_meta.json")
    p.add_argument("--min_rating", type=float, default=None,
                   help="MovieLens only: ratings below this become exposures (action 0); "
                        "default every event is a click")
    p.add_argument("--min_seq_len", type=int, default=3,
                   help="drop users with fewer events (at least 3, the leave-one-out minimum)")
    p.add_argument("--targets", choices=["last", "clicks"], default="last",
                   help="last: valid/test targets are each user's second-last/last event (the benchmark protocol); "
                        "clicks: the last two clicks, as in the TencentGR task (events before the first of them "
                        "train)")
    p.add_argument("--cold_items", type=float, default=0.0, metavar="FRAC",
                   help="share of the items made cold (>= 0, < 1; 0: none): their events leave training and the "
                        "valid/test histories, they stay candidates (not in the indexer) and targets")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the cold-item draw (numpy default_rng); the content vectors never depend on it")
    p.add_argument("--content", choices=["auto", "on", "off"], default="auto",
                   help="item content: decade/tag features and a fixed 64-value content vector "
                        "(creative_emb/emb_81_64.pkl) for every item; auto: on exactly with --cold_items")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        meta = convert(args.format, args.input, args.out, args.min_rating, args.min_seq_len, args.targets,
                       args.cold_items, args.seed, args.content)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:      # a full disk, an unwritable folder: one line, no traceback
        print(f"error: {os_error(e)}", file=sys.stderr)
        sys.exit(2)
    c = meta["counts"]
    print(f"{meta['format']} ({meta['variant']}): {c['users']} users, {c['items']} items, "
          f"{c['events']} events ({c['exposures']} exposures) -> {args.out}")
    if c["users_dropped"]:
        print(f"dropped {c['users_dropped']} users with < {args.min_seq_len} events "
              f"({c['events_dropped']} events)")
    if "cold_items" in meta:
        k = meta["cold_items"]
        print(f"cold items: {k['items']} of {k['candidates']} candidates (seed {k['seed']}); cold targets: "
              f"{k['valid_cold_targets']} valid, {k['test_cold_targets']} test; {k['users_dropped']} users dropped "
              f"(no warm history)")
    if "content" in meta:
        print(f"content vectors: {meta['content']['items_with_vector']} items -> {CONTENT_FILE}")
    if not meta["has_timestamps"]:
        print("notice: no timestamps in this dataset (ts = position); turn time features off")


if __name__ == "__main__":
    main()
