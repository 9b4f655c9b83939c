"""The built-in offline corpus: English prose that ships with every Python install.

Two sources, both present without any download:
  * `pydoc_data.topics.topics`, the long help texts behind `help('if')` etc., cut into
    sections at their reST-style headings;
  * docstrings of a FIXED, sorted list of standard-library modules (the module, each
    top-level function, each class together with the methods written in its body).

Cleaning is cheap and line/paragraph based: doctest paragraphs, grammar rules,
signature lines and paragraphs with too few letters (code) are dropped; hard-wrapped
lines are reflowed so a paragraph is one line. Paragraphs are deduplicated by the
hash of their normalised text (first occurrence in sorted-key order wins), so no
paragraph appears twice in the corpus and therefore never in two splits.

Everything is ordered by sorted keys and sha256, never by dict/set iteration order or
`hash()`, so the corpus is the same under any PYTHONHASHSEED (it does depend on the
Python version, whose docs it is; the cache key includes the version).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import warnings
from typing import NamedTuple

# Bump when the cleaning or the module list changes: it is part of the cache key.
BUILDER_VERSION = 3

# Public stdlib modules present in CPython 3.11-3.13 that are safe to import (no
# output, no windows, no browser: `this`, `antigravity`, `turtle`, `tkinter`,
# `idlelib` and modules deprecated for removal are left out on purpose). Sorted.
STDLIB_MODULES = (
    'abc',
    'argparse',
    'array',
    'ast',
    'asyncio',
    'asyncio.base_events',
    'asyncio.events',
    'asyncio.futures',
    'asyncio.locks',
    'asyncio.protocols',
    'asyncio.queues',
    'asyncio.runners',
    'asyncio.streams',
    'asyncio.subprocess',
    'asyncio.tasks',
    'asyncio.transports',
    'base64',
    'bdb',
    'binascii',
    'bisect',
    'builtins',
    'bz2',
    'cProfile',
    'calendar',
    'cmath',
    'cmd',
    'codecs',
    'codeop',
    'collections',
    'collections.abc',
    'colorsys',
    'compileall',
    'concurrent.futures',
    'concurrent.futures.process',
    'concurrent.futures.thread',
    'configparser',
    'contextlib',
    'contextvars',
    'copy',
    'copyreg',
    'csv',
    'ctypes',
    'dataclasses',
    'datetime',
    'dbm',
    'decimal',
    'difflib',
    'dis',
    'doctest',
    'email',
    'email.charset',
    'email.contentmanager',
    'email.errors',
    'email.feedparser',
    'email.generator',
    'email.header',
    'email.headerregistry',
    'email.iterators',
    'email.message',
    'email.parser',
    'email.policy',
    'email.utils',
    'enum',
    'errno',
    'faulthandler',
    'filecmp',
    'fileinput',
    'fnmatch',
    'fractions',
    'ftplib',
    'functools',
    'gc',
    'getopt',
    'gettext',
    'glob',
    'graphlib',
    'gzip',
    'hashlib',
    'heapq',
    'hmac',
    'html',
    'html.parser',
    'http',
    'http.client',
    'http.cookiejar',
    'http.cookies',
    'http.server',
    'imaplib',
    'importlib',
    'importlib.abc',
    'importlib.machinery',
    'importlib.metadata',
    'importlib.resources',
    'importlib.util',
    'inspect',
    'io',
    'ipaddress',
    'itertools',
    'json',
    'json.decoder',
    'json.encoder',
    'keyword',
    'linecache',
    'locale',
    'logging',
    'logging.config',
    'logging.handlers',
    'lzma',
    'mailbox',
    'marshal',
    'math',
    'mimetypes',
    'mmap',
    'modulefinder',
    'multiprocessing',
    'multiprocessing.connection',
    'multiprocessing.context',
    'multiprocessing.managers',
    'multiprocessing.pool',
    'multiprocessing.process',
    'multiprocessing.queues',
    'multiprocessing.shared_memory',
    'multiprocessing.synchronize',
    'netrc',
    'numbers',
    'operator',
    'optparse',
    'os',
    'os.path',
    'pathlib',
    'pickle',
    'pickletools',
    'pkgutil',
    'platform',
    'plistlib',
    'poplib',
    'pprint',
    'profile',
    'pstats',
    'py_compile',
    'pyclbr',
    'pydoc',
    'queue',
    'quopri',
    'random',
    're',
    'reprlib',
    'runpy',
    'sched',
    'secrets',
    'select',
    'selectors',
    'shelve',
    'shlex',
    'shutil',
    'signal',
    'smtplib',
    'socket',
    'socketserver',
    'sqlite3',
    'ssl',
    'stat',
    'statistics',
    'string',
    'stringprep',
    'struct',
    'subprocess',
    'symtable',
    'sys',
    'sysconfig',
    'tabnanny',
    'tarfile',
    'tempfile',
    'textwrap',
    'threading',
    'time',
    'timeit',
    'token',
    'tokenize',
    'tomllib',
    'trace',
    'traceback',
    'tracemalloc',
    'types',
    'typing',
    'unicodedata',
    'unittest',
    'unittest.case',
    'unittest.loader',
    'unittest.mock',
    'unittest.result',
    'unittest.runner',
    'unittest.suite',
    'urllib.error',
    'urllib.parse',
    'urllib.request',
    'urllib.robotparser',
    'uuid',
    'venv',
    'warnings',
    'wave',
    'weakref',
    'webbrowser',
    'wsgiref.handlers',
    'wsgiref.simple_server',
    'wsgiref.util',
    'xml.dom',
    'xml.dom.minidom',
    'xml.dom.pulldom',
    'xml.etree.ElementTree',
    'xml.parsers.expat',
    'xml.sax',
    'xml.sax.handler',
    'xml.sax.saxutils',
    'xml.sax.xmlreader',
    'xmlrpc.client',
    'xmlrpc.server',
    'zipapp',
    'zipfile',
    'zipimport',
    'zlib',
    'zoneinfo',
)


class Document(NamedTuple):
    """One document: a stable key (used for split assignment) and its cleaned text."""

    key: str
    text: str


# ---------------------------------------------------------------------------
# Cleaning.

_UNDERLINE = re.compile(r'^\s*([=\-*~^"#+.])\1{2,}\s*$')
# `name(args) -> result` lines at the top of C docstrings, and bare signatures.
_SIGNATURE = re.compile(r'^\s*[A-Za-z_][\w.]*\(.*\)\s*(->.*)?$')
_CODE_MARKERS = ('>>>', '... ', '$ ', '#!', '|')
# reST markup around names ("int", *args*, ``x``) is not code; it is ignored when
# counting letters.
_MARKUP = frozenset('"\'*`’“”')


def _is_code(para_lines: list[str]) -> bool:
    """A cheap test for code, grammar and doctest paragraphs (why: they are not prose)."""
    joined = ' '.join(line.strip() for line in para_lines)
    if any(line.lstrip().startswith(_CODE_MARKERS) for line in para_lines):
        return True
    if '::=' in joined:
        return True
    non_space = [c for c in joined if not c.isspace() and c not in _MARKUP]
    if not non_space:
        return True
    letters = sum(c.isalpha() for c in non_space)
    if letters / len(non_space) < 0.72:
        return True
    # Lines that end like code (assignments, calls, blocks) in most of the paragraph.
    codeish = sum(
        bool(re.search(r'(=|\)|:|;|\{|\}|\[|\])\s*$', l)) and bool(re.search(r'[=()\[\]{}]', l)) for l in para_lines
    )
    return codeish * 2 > len(para_lines) and len(para_lines) > 1


def clean_paragraphs(text: str) -> list[str]:
    """Split `text` at blank lines and return its prose paragraphs, each reflowed to one line."""
    out = []
    for para in re.split(r'\n\s*\n', text.replace('\r\n', '\n')):
        lines = [l for l in para.split('\n') if l.strip() and not _UNDERLINE.match(l) and not _SIGNATURE.match(l)]
        if not lines or _is_code(lines):
            continue
        flat = re.sub(r'\s+', ' ', ' '.join(l.strip() for l in lines)).strip()
        if len(flat.split(' ')) < 4:  # headings, lone names, fragments
            continue
        out.append(flat)
    return out


def normalise(text: str) -> str:
    """Lower-case, whitespace-collapsed form used for paragraph deduplication."""
    return re.sub(r'\s+', ' ', text).strip().lower()


def hash64(text: str) -> int:
    """The first 64 bits of sha256(text) as an int: independent of PYTHONHASHSEED, for orders and
    splits (prunesae_jax/io.py's stable_hash names cached work by the hex digest of JSON)."""
    return int.from_bytes(hashlib.sha256(text.encode('utf-8')).digest()[:8], 'big')


# ---------------------------------------------------------------------------
# Raw collection.


def _topic_sections(name: str, text: str) -> list[tuple[str, str]]:
    """Cut one pydoc topic at its headings (a line followed by an underline)."""
    lines = text.split('\n')
    # An underline at line i means a section starts at its title, line i - 1.
    cuts = sorted({0} | {i - 1 for i in range(2, len(lines)) if _UNDERLINE.match(lines[i]) and lines[i - 1].strip()})
    sections = []
    for j, a in enumerate(cuts):
        b = cuts[j + 1] if j + 1 < len(cuts) else len(lines)
        sections.append((f'topic:{name}#{j}', '\n'.join(lines[a:b])))
    return sections


@contextlib.contextmanager
def _quiet():
    """Silence warnings and stray output while importing stdlib modules."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter('ignore')
        yield


def _own_doc(obj) -> str:
    doc = obj.__dict__.get('__doc__') if isinstance(obj, type) else getattr(obj, '__doc__', None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ''


def _module_docs(modname: str) -> list[tuple[str, str]]:
    """Docstrings of one module: the module, its functions, its classes with their methods."""
    try:
        with _quiet():
            mod = importlib.import_module(modname)
    except BaseException as e:  # noqa: BLE001 -- a missing optional module (e.g. no _sqlite3)
        if isinstance(e, KeyboardInterrupt):
            raise
        return []
    docs = [(f'doc:{modname}', _own_doc(mod))]
    # Objects count as this module's when defined here or in its C accelerator / alias
    # (io -> _io, os -> posix, os.path -> posixpath).
    homes = {modname, '_' + modname, mod.__name__, '_' + mod.__name__}
    if modname == 'os':
        homes |= {'posix', 'nt'}
    members = vars(mod)
    for name in sorted(members):
        obj = members[name]
        # Private helpers often carry good prose too; module dunders (__getattr__) do not.
        if name.startswith('__') or getattr(obj, '__module__', None) not in homes:
            continue
        if isinstance(obj, type):
            parts = [_own_doc(obj)]
            for meth_name in sorted(vars(obj)):
                meth = vars(obj)[meth_name]
                if isinstance(meth, (staticmethod, classmethod)):
                    meth = meth.__func__
                qualname = getattr(meth, '__qualname__', None) or getattr(
                    getattr(meth, 'fget', None), '__qualname__', None
                )
                # Only methods written in the class body: libraries monkeypatch extra methods
                # onto stdlib classes (transformers on logging.Logger), which would make the
                # corpus depend on what the caller imported.
                if qualname == f'{obj.__qualname__}.{meth_name}' and (callable(meth) or isinstance(meth, property)):
                    parts.append(_own_doc(meth))
            docs.append((f'doc:{modname}.{name}', '\n\n'.join(p for p in parts if p)))
        elif callable(obj):
            docs.append((f'doc:{modname}.{name}', _own_doc(obj)))
    return docs


def collect_raw() -> list[tuple[str, str]]:
    """(key, raw text) for every candidate document, sorted by key."""
    from pydoc_data.topics import topics  # pylint: disable=import-outside-toplevel

    raw = []
    for name in sorted(topics):
        raw.extend(_topic_sections(name, topics[name]))
    for modname in STDLIB_MODULES:
        raw.extend(_module_docs(modname))
    raw = [(k, t) for k, t in raw if t and t.strip()]
    raw.sort(key=lambda kt: kt[0])
    return raw


# ---------------------------------------------------------------------------
# Build, dedup, order, cache.

MIN_DOC_CHARS = 80


def build_documents(isolated: bool = True) -> list[Document]:
    """Collect, clean and deduplicate the built-in corpus (no cache).

    Returns documents ordered by sha256 of their key: a fixed shuffle that interleaves
    help topics and docstrings, independent of PYTHONHASHSEED.

    Args:
      isolated: build in a fresh `python -I -S` subprocess that sees only the standard
        library, so the corpus cannot depend on what this process imported or patched
        (and nothing is imported here). Falls back to building in-process when the
        interpreter cannot be started (e.g. an embedded Python).
    """
    if isolated:
        try:
            out = subprocess.run(
                [sys.executable, '-I', '-S', os.path.abspath(__file__)], capture_output=True, check=True, timeout=600
            )
            return [Document(**json.loads(line)) for line in out.stdout.decode('utf-8').split('\n') if line.strip()]
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            warnings.warn(f'isolated build of the built-in corpus failed ({e!r}); building in-process')
    return _build_in_process()


def _build_in_process() -> list[Document]:
    seen: set[str] = set()  # membership only; never iterated, so order is not affected
    docs = []
    for key, raw in collect_raw():
        paras = []
        for para in clean_paragraphs(raw):
            h = hashlib.sha256(normalise(para).encode('utf-8')).hexdigest()
            if h not in seen:
                seen.add(h)
                paras.append(para)
        text = '\n\n'.join(paras)
        if len(text) >= MIN_DOC_CHARS:
            docs.append(Document(key, text))
    docs.sort(key=lambda d: (hash64('order:' + d.key), d.key))
    return docs


def cache_dir(path: str | os.PathLike | None = None) -> str:
    """The cache folder: `path`, else $PRUNESAE_CACHE, else ~/.cache/prunesae_jax."""
    if path is not None:
        return os.fspath(path)
    return os.environ.get('PRUNESAE_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'prunesae_jax')


def _cache_file(root: str) -> str:
    ver = '.'.join(map(str, sys.version_info[:3]))
    return os.path.join(root, 'corpus', f'builtin-py{ver}-v{BUILDER_VERSION}.jsonl')


def load_documents(
    *,
    cache: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> list[Document]:
    """The built-in corpus, read from the cache when present, else built and cached.

    Args:
      cache: cache root (default $PRUNESAE_CACHE or ~/.cache/prunesae_jax).
      use_cache: False builds from scratch and neither reads nor writes the cache.
    """
    if not use_cache:
        return build_documents(isolated=True)
    path = _cache_file(cache_dir(cache))
    if os.path.exists(path):
        try:
            with open(path, encoding='utf-8') as f:
                return [Document(**json.loads(line)) for line in f if line.strip()]
        except (ValueError, TypeError):
            pass  # a corrupt cache file is rebuilt below
    docs = build_documents(isolated=True)
    # Imported here: this file also runs as `python -I -S builtin.py`, which sees only the stdlib.
    from prunesae_jax import io as io_lib  # pylint: disable=g-import-not-at-top

    io_lib.atomic_write_text(path, ''.join(json.dumps(d._asdict(), ensure_ascii=False) + '\n' for d in docs))
    return docs


if __name__ == '__main__':
    # `python -I -S builtin.py`: the isolated build behind build_documents(); one JSON
    # document per line on stdout (utf-8 regardless of the locale).
    with open(sys.stdout.fileno(), 'w', encoding='utf-8', closefd=False) as _out:
        for _doc in _build_in_process():
            _out.write(json.dumps(_doc._asdict(), ensure_ascii=False) + '\n')
