"""SQLite-style ``:name`` parameters (the run records use them) on the Postgres backend."""

from __future__ import annotations

from patchd.store.postgres import positional, to_native


def test_named_parameters_become_positional() -> None:
    sql, args = positional("UPDATE runs SET a=:a, b=:b_2 WHERE id=:a", {"b_2": 2, "a": 1})
    assert (sql, args) == ("UPDATE runs SET a=?1, b=?2 WHERE id=?1", [1, 2])
    assert to_native(sql) == "UPDATE runs SET a=$1, b=$2 WHERE id=$1"


def test_casts_times_and_sequences_are_left_alone() -> None:
    sql = "SELECT x::int, '10:00' FROM t WHERE y = ?"
    assert positional(sql, (1,)) == (sql, (1,))
    assert positional("SELECT x::int FROM t WHERE y = :y", {"y": 3}) == (
        "SELECT x::int FROM t WHERE y = ?1",
        [3],
    )
