"""Flight SQL on the data port, through the real ADBC Flight SQL driver (adbc-driver-flightsql)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import adbc_driver_flightsql
import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager

from handoff import HandoffClient

ROWS = 200_000


def connect(server, token: bytes | None):
    kwargs = {}
    if token is not None:
        kwargs[adbc_driver_flightsql.DatabaseOptions.AUTHORIZATION_HEADER.value] = \
            "Bearer " + token.decode()
    return flightsql.connect(server.location, db_kwargs=kwargs)


@pytest.fixture(scope="module")
def links(server):
    rng = np.random.default_rng(7)
    ids = np.arange(ROWS, dtype=np.int64)
    features = pa.table({
        "id": ids,
        "x": rng.normal(size=ROWS),
        "split": pa.array(np.where(ids % 5 == 0, "test", "train")),
        "emb": pa.FixedSizeListArray.from_arrays(
            pa.array(rng.random(ROWS * 4, dtype=np.float32)), 4),
    })
    labels = pa.table({"id": ids[::2], "label": (ids[::2] % 3 == 0).astype(np.int64)})
    writer = HandoffClient(server.location, server.writer_token.decode())
    for name, table in [("features", features), ("labels", labels)]:
        for part in table.to_batches(max_chunksize=ROWS // 4):
            writer.put(name, pa.Table.from_batches([part]))
        writer.seal(name)
    # Open links are not tables yet.
    writer.put("unsealed", pa.table({"a": [1]}))
    return features, labels


def test_aggregate_with_a_filter_matches_pyarrow(server, links):
    features, _ = links
    with connect(server, server.reader_token) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), avg(x) FROM features WHERE split = 'train'")
        count, mean = cur.fetchone()
    train = features.filter(pc.equal(features["split"], "train"))
    assert count == train.num_rows
    assert mean == pytest.approx(pc.mean(train["x"]).as_py(), rel=1e-9)


def test_a_join_of_two_links(server, links):
    features, labels = links
    with connect(server, server.reader_token) as conn, conn.cursor() as cur:
        cur.execute("""
            SELECT f.split, count(*) AS n, sum(l.label) AS positives
            FROM features f JOIN labels l ON f.id = l.id
            GROUP BY f.split ORDER BY f.split""")
        got = cur.fetch_arrow_table()
    joined = features.select(["id", "split"]).join(labels, "id", join_type="inner")
    want = joined.group_by("split").aggregate([("id", "count"), ("label", "sum")]).sort_by("split")
    assert got.column("split").to_pylist() == want.column("split").to_pylist()
    assert got.column("n").to_pylist() == want.column("id_count").to_pylist()
    assert got.column("positives").to_pylist() == want.column("label_sum").to_pylist()


def test_catalog_calls_list_sealed_links_with_their_schemas(server, links):
    with connect(server, server.reader_token) as conn:
        schema = conn.adbc_get_table_schema("features")
        assert schema.names == ["id", "x", "split", "emb"]
        objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
        tables = sorted(t["table_name"] for c in objects for s in c["catalog_db_schemas"]
                        for t in s["db_schema_tables"])
        assert "features" in tables and "labels" in tables
        assert "unsealed" not in tables, "only sealed links are tables"
        with conn.cursor() as cur:
            cur.execute("SELECT table_name FROM information_schema.tables")
            listed = {row[0] for row in cur.fetchall()}
        assert {"features", "labels"} <= listed and "unsealed" not in listed, listed
        info = conn.adbc_get_info()
        assert info["vendor_name"] == "handoff"


def test_reads_obey_the_tokens_of_link_reads(server, links):
    # No token, or a wrong one: refused before anything runs.
    for token in (None, b"not-a-token"):
        with pytest.raises(adbc_driver_manager.Error, match="(?i)unauthenticated|token"):
            with connect(server, token) as conn, conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM features")
                cur.fetchall()
    # A per-link reader token sees its own link only.
    admin = HandoffClient(server.location, server.admin_token.decode())
    admin.create("private", reader_token="only-private")
    HandoffClient(server.location, server.admin_token.decode()).put("private", pa.table({"v": [1, 2, 3]}))
    admin.seal("private")
    with connect(server, b"only-private") as conn, conn.cursor() as cur:
        cur.execute("SELECT sum(v) FROM private")
        assert cur.fetchone() == (6,)
        with pytest.raises(adbc_driver_manager.Error, match="features"):
            cur.execute("SELECT count(*) FROM features")
            cur.fetchall()


def test_errors_name_the_tables_one_may_query(server, links):
    with connect(server, server.reader_token) as conn, conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.Error) as err:
            cur.execute("SELECT * FROM nope")
        message = str(err.value)
        assert "features" in message and "labels" in message, message
        with pytest.raises(adbc_driver_manager.Error, match="read-only"):
            cur.execute("INSERT INTO labels VALUES (1, 1)")
            cur.fetchall()


def test_prepared_statements_run_and_refuse_parameters_with_the_fix(server, links):
    features, _ = links
    with connect(server, server.reader_token) as conn, conn.cursor() as cur:
        query = "SELECT count(*) AS n FROM features WHERE x > 0"
        cur.adbc_prepare(query)
        for _ in range(2):  # a prepared statement runs more than once
            cur.execute(query)
            assert cur.fetchone() == (pc.sum(pc.greater(features["x"], 0)).as_py(),)
        with pytest.raises(adbc_driver_manager.Error, match="write the values into the SQL"):
            cur.execute("SELECT count(*) FROM features WHERE x > $1", parameters=(0.5,))
            cur.fetchall()
