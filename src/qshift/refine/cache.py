"""An on-disk cache of rewrites: one SQLite file per backend identity.

The identity (backend + model + prompt + vocabulary + decoding settings, hashed) names
the file and is stored inside it; a file written by another backend is refused rather
than read. SQLite commits are atomic, so an interrupted run keeps every rewrite it
finished and the next run resumes from them.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from qshift.errors import StoreMismatchError


class RewriteCache:
    def __init__(self, path: str | Path, identity: str) -> None:
        self.path, self.identity = Path(path), identity
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False)
            with self._db:
                self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
                self._db.execute("CREATE TABLE IF NOT EXISTS rewrites (query TEXT PRIMARY KEY, rewrite TEXT)")
                row = self._db.execute("SELECT value FROM meta WHERE key = 'identity'").fetchone()
                if row is None:
                    self._db.execute("INSERT INTO meta VALUES ('identity', ?)", (identity,))
        except sqlite3.DatabaseError as exc:
            raise StoreMismatchError(f"{self.path}: not a rewrite cache ({exc})") from None
        if row is not None and row[0] != identity:
            self._db.close()
            raise StoreMismatchError(f"{self.path}: a rewrite cache of another backend ({row[0]}), not "
                                     f"{identity}; give this backend its own cache file")
        self.hits = self.misses = 0

    def get_many(self, queries: list[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        with self._lock:
            uniq = list(dict.fromkeys(queries))
            for s in range(0, len(uniq), 500):
                part = uniq[s:s + 500]
                rows = self._db.execute(f"SELECT query, rewrite FROM rewrites WHERE query IN "
                                        f"({','.join('?' * len(part))})", part).fetchall()
                out.update(rows)
        self.hits += sum(q in out for q in queries)
        self.misses += sum(q not in out for q in queries)
        return out

    def put_many(self, pairs: dict[str, str]) -> None:
        if not pairs:
            return
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO rewrites VALUES (?, ?)", list(pairs.items()))

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM rewrites").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
