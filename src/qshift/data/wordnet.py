"""WordNet for the word-level corruptions, installed offline from Debian's packages.

No PyPI package ships WordNet's data and NLTK's downloader needs the internet, so
``ensure_wordnet()`` fetches Debian's ``wordnet-base`` and ``wordnet-sense-index``
(``apt-get download``, no root needed to unpack), extracts them with ``dpkg-deb`` and
copies the database files into ``$QSHIFT_CACHE/nltk_data/corpora/wordnet/`` together
with the ``lexnames`` file NLTK expects. A WordNet NLTK already finds is used as is.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

from qshift.errors import QShiftError
from qshift.paths import cache_dir

DEB_PACKAGES = ("wordnet-base", "wordnet-sense-index")
# The 45 lexicographer files of WordNet 3.0 (wndb(5WN), "lexnames"): number, name, syntactic category.
LEXNAMES = """adj.all 3|adj.pert 3|adv.all 4|noun.Tops 1|noun.act 1|noun.animal 1|noun.artifact 1|noun.attribute 1|
noun.body 1|noun.cognition 1|noun.communication 1|noun.event 1|noun.feeling 1|noun.food 1|noun.group 1|
noun.location 1|noun.motive 1|noun.object 1|noun.person 1|noun.phenomenon 1|noun.plant 1|noun.possession 1|
noun.process 1|noun.quantity 1|noun.relation 1|noun.shape 1|noun.state 1|noun.substance 1|noun.time 1|
verb.body 2|verb.change 2|verb.cognition 2|verb.communication 2|verb.competition 2|verb.consumption 2|
verb.contact 2|verb.creation 2|verb.emotion 2|verb.motion 2|verb.perception 2|verb.possession 2|verb.social 2|
verb.stative 2|verb.weather 2|adj.ppl 3"""


class WordNetUnavailable(QShiftError):
    """WordNet's data could not be found or installed."""


def nltk_data_dir() -> Path:
    return cache_dir() / "nltk_data"


def install_wordnet(target: Path | None = None) -> Path:
    """Install WordNet from Debian's packages into ``target`` (an NLTK data folder)."""
    target = target or nltk_data_dir()
    dest = target / "corpora" / "wordnet"
    if (dest / "data.noun").is_file() and (dest / "lexnames").is_file():
        return target
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise WordNetUnavailable(
                f"WordNet is not installed and {tool!r} is missing to fetch Debian's {', '.join(DEB_PACKAGES)}; "
                f"copy WordNet 3.0's dict files into {dest} (or run nltk.download('wordnet') when online)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        res = subprocess.run(["apt-get", "download", *DEB_PACKAGES], cwd=tmp, capture_output=True, text=True)
        debs = list(tmp_path.glob("*.deb"))
        if res.returncode != 0 or len(debs) < len(DEB_PACKAGES):
            raise WordNetUnavailable(f"apt-get download {' '.join(DEB_PACKAGES)} failed: "
                                     f"{(res.stderr or res.stdout).strip()[-400:]}")
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path / "x")], check=True)
        src = tmp_path / "x" / "usr" / "share" / "wordnet"
        staging = Path(tempfile.mkdtemp(prefix=".wordnet.", dir=_mkdir(dest.parent)))
        for f in src.iterdir():
            shutil.copyfile(f, staging / f.name)  # copies, not links: the temp dir goes away
        lex = [entry.split() for entry in LEXNAMES.replace("\n", "").split("|")]
        (staging / "lexnames").write_text("".join(f"{i:02d}\t{n}\t{c}\n" for i, (n, c) in enumerate(lex)))
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)  # atomic: a half-copied database is never visible
    return target


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


@functools.lru_cache(maxsize=1)
def wordnet():  # noqa: ANN201 - nltk's WordNetCorpusReader
    """NLTK's WordNet reader, installing the data on first use if needed."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    ours = str(nltk_data_dir())
    if ours not in nltk.data.path:
        nltk.data.path.append(ours)  # NLTK only reads corpora below its data path
    try:
        path = nltk.data.find("corpora/wordnet")
    except LookupError:
        install_wordnet()
        path = nltk.data.find("corpora/wordnet")
    import warnings

    with warnings.catch_warnings():  # "multilingual functions are not available": we use English only
        warnings.simplefilter("ignore", UserWarning)
        reader = WordNetCorpusReader(path, None)
    reader.synsets("dog")  # fail now, naming the folder, rather than mid-corruption
    return reader


@functools.lru_cache(maxsize=50000)
def synonyms(word: str) -> tuple[str, ...]:
    """WordNet synonyms of ``word`` (all parts of speech), excluding the word itself."""
    out: list[str] = []
    low = word.lower()
    for syn in wordnet().synsets(low):
        for lemma in syn.lemmas():
            name = lemma.name().replace("_", " ").replace("-", " ").lower()
            if name != low and name.isascii() and name not in out:
                out.append(name)
    return tuple(out)
