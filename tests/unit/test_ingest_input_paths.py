"""The cached input-URI resolver answers exactly what resolve + check_inside + as_uri answered."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from patchd.exceptions import PathNotAllowedError, ValidationError
from patchd.ingest.fields import check_inside, resolve_input_path
from patchd.ingest.input_paths import InputResolver


def _reference(uri: str, roots: tuple[Path, ...]) -> str:
    path = resolve_input_path(uri)
    check_inside(path, roots, uri)
    return path.as_uri()


def _outcome(fn: object, uri: str) -> str:
    try:
        return fn(uri)  # type: ignore[operator,no-any-return]
    except PathNotAllowedError:
        return "path_not_allowed"
    except ValidationError as err:
        return err.reason


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a b" / "c").mkdir(parents=True)
    (root / "a b" / "c" / "x%.png").write_bytes(b"x")
    (root / "img.png").write_bytes(b"x")
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"s")
    (tmp_path / "root2").mkdir()
    (tmp_path / "root2" / "y.png").write_bytes(b"y")
    (root / "escape").symlink_to(outside)
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "inner.png").symlink_to(root / "img.png")
    return root, outside


def test_resolver_matches_the_reference_on_tricky_paths(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    roots = (root.resolve(),)
    resolver = InputResolver(roots)
    uris = [
        str(root / "img.png"),
        (root / "a b" / "c" / "x%.png").as_uri(),
        f"file://{root}/a%20b/c/x%25.png",
        str(root / "escape" / "secret.png"),
        str(root / "link.png"),
        str(root / "inner.png"),
        str(root / "a b" / ".." / ".." / "outside" / "secret.png"),
        str(root / "a b" / ".."),
        str(root / "a b" / "c" / "."),
        str(root / "missing.png"),
        str(root / "nodir" / "missing.png"),
        str(root) + "//a b//c/x%.png",
        str(root),
        str(root.parent / "root2" / "y.png"),  # a sibling sharing the root's name as a prefix
        str(outside / "secret.png"),
        "relative/path.png",
        "http://example.com/x.png",
        "file://remote/x.png",
    ]
    for uri in uris:
        for _ in range(2):  # the second call answers from the directory cache
            want = _outcome(lambda u: _reference(u, roots), uri)
            assert _outcome(resolver.file_uri, uri) == want, uri
    assert _outcome(resolver.file_uri, str(root / "link.png")) == "path_not_allowed"


def test_a_directory_swapped_for_a_symlink_is_noticed_after_the_ttl(
    tree: tuple[Path, Path],
) -> None:
    root, outside = tree
    (root / "d").mkdir()
    (root / "d" / "secret.png").write_bytes(b"x")
    (outside / "d").mkdir()
    (outside / "d" / "secret.png").write_bytes(b"s")
    resolver = InputResolver((root.resolve(),), ttl_s=0.0)
    uri = str(root / "d" / "secret.png")
    assert resolver.file_uri(uri) == (root / "d" / "secret.png").resolve().as_uri()
    os.rename(root / "d", root / "d.old")
    (root / "d").symlink_to(outside / "d")
    with pytest.raises(PathNotAllowedError):
        resolver.file_uri(uri)
