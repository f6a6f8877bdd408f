"""mkdocs hook: links from a docs page to a repository file outside ``docs/`` (a config file, say).

Such a link, ``[sweep](../configs/sweeps/confirmatory.yaml)``, works when the Markdown is read in
the repository but points outside the built site. This hook copies each linked file into the site
under ``repository/`` and points the link at the copy, so the link works in both places and
``mkdocs build --strict`` still checks every other link. Only files that exist and are not
Markdown pages are copied; any other link outside ``docs/`` is left for mkdocs to report.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

LINK = re.compile(r"\]\((\.\./[^)\s#]+)(#[^)\s]*)?\)")
PREFIX = "repository"


def _repo_file(page_uri: str, target: str, docs_dir: Path) -> str | None:
    """The repository-relative path a page's ``../`` link names, when it is a file outside
    ``docs/`` that this hook copies; else None."""
    rel = posixpath.normpath(posixpath.join(posixpath.dirname(page_uri), target))
    if not rel.startswith("../"):
        return None
    repo = docs_dir.parent.resolve()
    path = (docs_dir / rel).resolve()
    if repo not in path.parents or not path.is_file() or path.suffix == ".md":
        return None
    return path.relative_to(repo).as_posix()


def on_files(files, config):
    docs_dir = Path(config["docs_dir"])
    for page in list(files.documentation_pages()):
        text = Path(page.abs_src_path).read_text(encoding="utf-8")
        for m in LINK.finditer(text):
            rel = _repo_file(page.src_uri, m.group(1), docs_dir)
            uri = f"{PREFIX}/{rel}"
            if rel is not None and files.get_file_from_path(uri) is None:
                files.append(File.generated(config, uri, abs_src_path=str(docs_dir.parent / rel)))
    return files


def on_page_markdown(markdown, page, config, files):
    docs_dir = Path(config["docs_dir"])

    def point_at_copy(m: re.Match) -> str:
        rel = _repo_file(page.file.src_uri, m.group(1), docs_dir)
        if rel is None:
            return m.group(0)
        here = posixpath.dirname(page.file.src_uri) or "."
        return f"]({posixpath.relpath(f'{PREFIX}/{rel}', here)}{m.group(2) or ''})"

    return LINK.sub(point_at_copy, markdown)
