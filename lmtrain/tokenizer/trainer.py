"""Byte-level BPE training.

`train_bpe(path, vocab_size, special_tokens)` returns `(vocab, merges)`: ids 0.. are the special tokens,
then the 256 single bytes, then one token per learned merge. Each step merges the most frequent adjacent
pair; ties go to the lexicographically greatest pair of byte strings, so a run is deterministic.

Two phases:
1. Pre-tokenisation: the file is cut into chunks whose boundaries fall on a special token (or, without
   special tokens, right after a newline between two visible ASCII characters, a point where the GPT-2
   pattern always separates pre-tokens). Worker processes read their own chunk, split it on the special
   tokens and count pre-tokens; only the counters travel back, so memory follows the number of distinct
   pre-tokens, not the file size.
2. Merging: pair counts are updated incrementally. A pair -> words index says which words a merge
   touches; only those words are rewritten and only their pairs re-counted. The best pair comes from a
   heap with lazy invalidation: an entry is used only if its count still matches the live count.
"""

from __future__ import annotations

import heapq
import multiprocessing
import os
import re
import sys
from collections import Counter
from pathlib import Path

from lmtrain.errors import UserError
from lmtrain.tokenizer.pretokenize import GPT2_REGEX, special_splitter, split_on_specials

# Below this size the process pool costs more than it saves.
_PARALLEL_MIN_BYTES = 4 << 20
# Upper bound of one chunk in memory (a worker holds its bytes and decoded text at once).
_MAX_CHUNK_BYTES = 64 << 20
# Smallest chunk handed to a worker, and how far a boundary search reads at a time.
_MIN_CHUNK_BYTES = 1 << 20
_SCAN_BYTES = 1 << 20


def validate_special_tokens(special_tokens, where: str = "special_tokens") -> list[str]:
    """Check the special tokens: non-empty strings, no duplicates. Returns them as a list."""
    if special_tokens is None:
        return []
    if isinstance(special_tokens, str):
        raise UserError(f"{where}: expected a list of strings, got the single string {special_tokens!r}")
    tokens = list(special_tokens)
    seen: set[str] = set()
    for i, tok in enumerate(tokens):
        if not isinstance(tok, str):
            raise UserError(f"{where}[{i}]: expected a string, got {type(tok).__name__} {tok!r}")
        if tok == "":
            raise UserError(f"{where}[{i}] is empty: a special token needs at least one character")
        if tok in seen:
            raise UserError(f"{where}: {tok!r} is given twice; list each special token once")
        seen.add(tok)
    return tokens


# A lone newline between two visible ASCII characters: the newline is a pre-token of its own whatever
# follows, and nothing after it joins it. (After a longer whitespace run, `\s+(?!\S)` would keep the
# run whole at the end of a chunk but split off its last character in the full text.)
_NEWLINE_CUT = re.compile(rb"[\x21-\x7e]\n[\x21-\x7e]")


def _boundary_patterns(special_tokens: list[str]) -> list[bytes]:
    return [s.encode("utf-8") for s in special_tokens]


def _inside_other_special(fh, p: int, special_bytes: list[bytes]) -> bool:
    """Whether some special token occurrence starts before byte `p` and ends after it (e.g. `<a>` found
    inside `x<a>`): a chunk boundary there would leave part of that special token as text."""
    longest = max(len(t) for t in special_bytes)
    lo = max(0, p - longest + 1)
    fh.seek(lo)
    around = fh.read(p - lo + longest)
    for t in special_bytes:
        for k in range(1, len(t)):
            q = p - k - lo
            if q >= 0 and around[q : q + len(t)] == t:
                return True
    return False


def _find_boundary(fh, start: int, file_size: int, special_bytes: list[bytes]) -> int:
    """The first safe chunk boundary at or after `start` (file_size if none).

    With special tokens: the start of a special token occurrence that no other special token occurrence
    spans (splitting there changes nothing, the text is cut there anyway). Without: the position after
    a lone b"\\n" between visible ASCII bytes.
    """
    overlap = max((len(s) for s in special_bytes), default=3)
    pos = start
    while pos < file_size:
        fh.seek(pos)
        window = fh.read(_SCAN_BYTES + overlap)
        if not window:
            break
        if special_bytes:
            # Candidates in increasing order: the next occurrence of each special token.
            nexts = {s: window.find(s) for s in special_bytes}
            while True:
                live = [(i, s) for s, i in nexts.items() if 0 <= i <= _SCAN_BYTES]
                if not live:
                    break
                i, s = min(live)
                if not _inside_other_special(fh, pos + i, special_bytes):
                    return pos + i
                nexts[s] = window.find(s, i + 1)
        else:
            m = _NEWLINE_CUT.search(window)
            if m is not None and m.start() + 2 <= _SCAN_BYTES:
                return pos + m.start() + 2
        pos += _SCAN_BYTES
    return file_size


def _chunk_ranges(
    path: Path, file_size: int, special_bytes: list[bytes], workers: int
) -> list[tuple[int, int]]:
    # Several chunks per worker balance the load; the cap bounds memory for files larger than RAM.
    if file_size < _PARALLEL_MIN_BYTES or workers <= 1:
        target = _MAX_CHUNK_BYTES
    else:
        target = min(_MAX_CHUNK_BYTES, max(_MIN_CHUNK_BYTES, file_size // (2 * workers)))
    bounds = [0]
    with open(path, "rb") as fh:
        while bounds[-1] < file_size:
            nxt = bounds[-1] + target
            if nxt >= file_size:
                bounds.append(file_size)
                break
            b = _find_boundary(fh, nxt, file_size, special_bytes)
            bounds.append(b)
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _count_chunk(args: tuple[str, int, int, list[str]]) -> tuple[Counter | None, int | None, str]:
    """Count the pre-tokens of one chunk. Returns (counter, None, "") or (None, bad_offset, reason)."""
    path, start, end, special_tokens = args
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read(end - start)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, start + exc.start, exc.reason
    del data
    counts: Counter = Counter()
    findall = GPT2_REGEX.findall
    for piece, is_special in split_on_specials(text, special_splitter(special_tokens)):
        if not is_special:
            counts.update(findall(piece))
    return counts, None, ""


def _progress(total_desc: str):
    """A rich progress bar on a terminal; elsewhere (batch jobs, pipes) a line every few seconds."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lmtrain.log import LineProgress

    console = Console(file=sys.stderr)
    if not console.is_terminal:
        return LineProgress(f"bpe {total_desc}")
    return Progress(
        TextColumn(total_desc),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def count_pretokens(
    input_path: str | os.PathLike, special_tokens: list[str], num_workers: int | None = None
) -> Counter:
    """Pre-token string -> count over the whole file (special tokens removed)."""
    path = Path(input_path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; pass the path of a UTF-8 text file to train on")
    file_size = path.stat().st_size
    if file_size == 0:
        raise UserError(f"{path} is empty: BPE training needs some UTF-8 text")
    workers = num_workers or min(os.cpu_count() or 1, 8)
    ranges = _chunk_ranges(path, file_size, _boundary_patterns(special_tokens), workers)
    jobs = [(str(path), a, b, special_tokens) for a, b in ranges]
    total: Counter = Counter()
    bad_spots: list[tuple[int, str]] = []

    def absorb(result) -> None:
        counts, bad, reason = result
        if counts is None:
            bad_spots.append((bad, reason))
            return
        if not total:
            total.update(counts)  # the first counter is adopted wholesale
        else:
            get = total.get
            for tok, c in counts.items():
                total[tok] = get(tok, 0) + c

    with _progress("pre-tokenising") as progress:
        task = progress.add_task("pre", total=len(jobs))
        if len(jobs) == 1 or workers <= 1:
            for job in jobs:
                absorb(_count_chunk(job))
                progress.advance(task)
        else:
            # Fork start method where available: workers need nothing but this module's functions.
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            with ctx.Pool(min(workers, len(jobs))) as pool:
                for result in pool.imap_unordered(_count_chunk, jobs):
                    absorb(result)
                    progress.advance(task)
    if bad_spots:
        # Chunks finish in any order: report the first bad byte of the file, whichever chunk saw it.
        bad, reason = min(bad_spots)
        raise UserError(
            f"{path}: not valid UTF-8 at byte offset {bad} ({reason}); re-encode the file as UTF-8 "
            f"(e.g. `iconv -f latin1 -t utf-8`) before training"
        )
    return total


def _inverted_key(token: bytes) -> str:
    """A string whose ascending order is the *descending* order of `token` among byte strings.

    Each byte b becomes chr(255 - b) and a terminator chr(256), greater than any of them, closes the
    key: a proper prefix (smaller as bytes) then sorts after its extensions. Keys of two tokens
    concatenated order pairs like the tuple (first, second) in reverse, which lets a min-heap pick the
    lexicographically greatest pair among equal counts with C-speed string comparisons.
    """
    return token.decode("latin-1").translate(_INVERT) + "\u0100"


_INVERT = {b: 255 - b for b in range(256)}


def merge_pretokens(
    word_counts: dict[bytes, int], vocab_size: int, special_tokens: list[str]
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Learn merges from pre-token byte strings and their counts (phase 2 of `train_bpe`)."""
    n_special = len(special_tokens)
    # Internal ids: 0..255 are the bytes, 256.. the merged tokens; specials are prepended at the end.
    tok_bytes: list[bytes] = [bytes([b]) for b in range(256)]
    tok_key: list[str] = [_inverted_key(t) for t in tok_bytes]
    bytes_to_id: dict[bytes, int] = {t: i for i, t in enumerate(tok_bytes)}
    merges: list[tuple[bytes, bytes]] = []

    words: list[list[int]] = []
    counts: list[int] = []
    for tok, c in word_counts.items():
        if len(tok) > 1:  # single bytes have no pairs and never change
            words.append(list(tok))
            counts.append(c)

    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for wi, word in enumerate(words):
        c = counts[wi]
        for pair in zip(word, word[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + c
            s = where.get(pair)
            if s is None:
                where[pair] = {wi}
            else:
                s.add(wi)
    heap = [(-c, tok_key[a] + tok_key[b], a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    n_merges = max(0, vocab_size - n_special - 256)
    with _progress("merging") as progress:
        task = progress.add_task("merge", total=n_merges)
        while len(tok_bytes) + n_special < vocab_size:
            # Pop stale entries until the top matches the live count of its pair.
            while heap:
                negc, _, a, b = heap[0]
                if pair_counts.get((a, b)) == -negc:
                    break
                heapq.heappop(heap)
            if not heap:
                break  # every word is a single token: nothing left to merge
            _, _, a, b = heapq.heappop(heap)
            merged = tok_bytes[a] + tok_bytes[b]
            merges.append((tok_bytes[a], tok_bytes[b]))
            new = bytes_to_id.get(merged)
            if new is None:
                # A second route to existing bytes (e.g. "a"+"bc" after "ab"+"c") reuses that token,
                # as Hugging Face's trainer does, so every id has distinct bytes.
                new = len(tok_bytes)
                tok_bytes.append(merged)
                tok_key.append(_inverted_key(merged))
                bytes_to_id[merged] = new
                progress.advance(task)
            changed = _apply_merge(a, b, new, words, counts, pair_counts, where)
            for pair in changed:
                c = pair_counts.get(pair, 0)
                if c > 0:
                    heapq.heappush(heap, (-c, tok_key[pair[0]] + tok_key[pair[1]], pair[0], pair[1]))
                elif pair in pair_counts:
                    del pair_counts[pair]

    vocab: dict[int, bytes] = {i: s.encode("utf-8") for i, s in enumerate(special_tokens)}
    for i, t in enumerate(tok_bytes):
        vocab[n_special + i] = t
    return vocab, merges


def _apply_merge(a, b, new, words, counts, pair_counts, where) -> set[tuple[int, int]]:
    """Rewrite every word holding (a, b) and adjust only the pairs around each occurrence.

    For an occurrence x a b y: (x, a) and (b, y) lose the word's count, (x, new) and (new, y) gain it.
    Back-to-back occurrences (a b a b) share the middle pair: it is handled once, as the left pair of
    the second occurrence, which gains (new, new). Returns the pairs whose count changed.
    """
    changed: set[tuple[int, int]] = set()
    affected = where.pop((a, b), ())
    pair_counts.pop((a, b), None)
    merged = (a, b)
    get = pair_counts.get
    for wi in affected:
        word = words[wi]
        n = len(word)
        c = counts[wi]
        out: list[int] = []
        i = 0
        touched = False
        index = word.index
        while True:
            # Jump to the next `a` in C; copy the stretch before it as a slice.
            try:
                j = index(a, i)
            except ValueError:
                break
            if j + 1 >= n or word[j + 1] != b:
                out.extend(word[i : j + 1])
                i = j + 1
                continue
            touched = True
            if j > i:
                out.extend(word[i:j])
            if out:
                old = (word[j - 1], a)
                if old != merged:
                    pair_counts[old] = get(old, 0) - c
                    changed.add(old)
                fresh = (out[-1], new)
                pair_counts[fresh] = get(fresh, 0) + c
                changed.add(fresh)
                where.setdefault(fresh, set()).add(wi)
            if j + 2 < n:
                right = word[j + 2]
                if not (right == a and j + 3 < n and word[j + 3] == b):
                    old = (b, right)
                    if old != merged:
                        pair_counts[old] = get(old, 0) - c
                        changed.add(old)
                    fresh = (new, right)
                    pair_counts[fresh] = get(fresh, 0) + c
                    changed.add(fresh)
                    where.setdefault(fresh, set()).add(wi)
            out.append(new)
            i = j + 2
        if touched:
            # The index may hold words that lost this pair in an earlier merge: those stay untouched.
            out.extend(word[i:])
            words[wi] = out
    return changed


def train_bpe(
    input_path: str | os.PathLike,
    vocab_size: int,
    special_tokens: list[str] | None = None,
    num_workers: int | None = None,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train a byte-level BPE on a UTF-8 text file.

    Returns (vocab, merges): vocab maps ids to token bytes (special tokens first, then the 256 bytes,
    then merged tokens in the order learned); merges lists the merged pairs in order. Training stops
    early when no pair is left (tiny inputs), so the vocabulary may be smaller than `vocab_size`.
    """
    specials = validate_special_tokens(special_tokens)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise UserError(f"vocab_size: expected an integer, got {vocab_size!r}")
    minimum = 256 + len(specials)
    if vocab_size < minimum:
        raise UserError(
            f"vocab_size={vocab_size} is too small: the 256 byte tokens and {len(specials)} special "
            f"token(s) already need {minimum}; pass a vocab_size of at least {minimum}"
        )
    text_counts = count_pretokens(input_path, specials, num_workers)
    word_counts = {tok.encode("utf-8"): c for tok, c in text_counts.items()}
    return merge_pretokens(word_counts, vocab_size, specials)
