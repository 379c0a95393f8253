#![allow(clippy::unwrap_used)]
use super::*;
use crate::flows::tests::edge;
use crate::testing::{TempDir, temp_store};
use bulkhead_policy::model::Direction::{Egress, Ingress};
use std::time::Duration;

/// 2024-05-01 10:00 UTC: the start of an hour.
const T0: u64 = 1_714_557_600;
const H: u64 = 3600;

fn retention(window_hours: u64, max_rows: u64) -> FlowRetention {
    FlowRetention {
        window: Duration::from_secs(window_hours * H),
        max_rows,
        max_rows_per_workload: u64::MAX,
        ..FlowRetention::default()
    }
}

/// `(hour, path, count)` of every stored row, by hour and path.
fn rows(store: &Store) -> Vec<(u64, String, u64)> {
    let mut out = Vec::new();
    store
        .each_edge_row(0, |hour, e| {
            out.push((hour, e.key.path.unwrap(), e.stats.count))
        })
        .unwrap();
    out.sort();
    out
}

fn counts(edges: &[Edge]) -> Vec<(&str, u64)> {
    edges
        .iter()
        .map(|e| (e.key.path.as_deref().unwrap(), e.stats.count))
        .collect()
}

#[test]
fn reports_of_one_edge_merge_into_one_row() {
    let t = temp_store("merge");
    let keep = retention(24, 1000);
    let first = t
        .store
        .merge_edges(
            &mut [
                edge("frontend", "orders", Ingress, "/a", T0 + 10),
                edge("frontend", "orders", Ingress, "/a", T0 + 20),
            ],
            T0 + 30,
            &keep,
        )
        .unwrap();
    assert_eq!(first.stored, 2);
    let second = t
        .store
        .merge_edges(
            &mut [
                edge("frontend", "orders", Ingress, "/a", T0 + 40),
                edge("frontend", "orders", Ingress, "/b", T0 + 50),
            ],
            T0 + 60,
            &keep,
        )
        .unwrap();
    assert_eq!(second.stored, 2);
    assert_eq!(
        rows(&t.store),
        vec![(T0, "/a".into(), 3), (T0, "/b".into(), 1)]
    );
    let edges = t.store.edges_since(0).unwrap();
    assert_eq!(counts(&edges), vec![("/a", 3), ("/b", 1)]);
    assert_eq!(edges[0].stats.first_seen, T0 + 10);
    assert_eq!(edges[0].stats.last_seen, T0 + 40);
    assert_eq!(edges[0].stats.bytes_in, 30);
}

#[test]
fn edges_are_kept_per_hour_and_since_picks_hours() {
    let t = temp_store("hours");
    let keep = retention(24, 1000);
    t.store
        .merge_edges(
            &mut [
                edge("frontend", "orders", Ingress, "/a", T0 + 5),
                edge("frontend", "orders", Ingress, "/a", T0 + H + 5),
                edge("frontend", "orders", Ingress, "/a", T0 + 2 * H + 5),
                edge("orders", "db", Egress, "/q", T0 + 2 * H + 6),
            ],
            T0 + 2 * H + 10,
            &keep,
        )
        .unwrap();
    assert_eq!(
        rows(&t.store),
        vec![
            (T0, "/a".into(), 1),
            (T0 + H, "/a".into(), 1),
            (T0 + 2 * H, "/a".into(), 1),
            (T0 + 2 * H, "/q".into(), 1),
        ]
    );
    // Across hours, equal keys are one edge.
    let all = t.store.edges_since(0).unwrap();
    assert_eq!(counts(&all), vec![("/a", 3), ("/q", 1)]);
    assert_eq!(all[0].stats.first_seen, T0 + 5);
    // `since` counts from the start of its hour.
    let recent = t.store.edges_since(T0 + H + 1800).unwrap();
    assert_eq!(counts(&recent), vec![("/a", 2), ("/q", 1)]);
    assert!(t.store.edges_since(T0 + 3 * H).unwrap().is_empty());
}

#[test]
fn hours_past_the_window_are_deleted_on_a_report_and_not_stored() {
    let t = temp_store("retention");
    let keep = retention(2, 1000);
    t.store
        .merge_edges(
            &mut [
                edge("frontend", "orders", Ingress, "/old", T0 + 5),
                edge("frontend", "orders", Ingress, "/newer", T0 + H + 5),
            ],
            T0 + H + 10,
            &keep,
        )
        .unwrap();
    assert_eq!(rows(&t.store).len(), 2);

    // Three hours later the window starts at T0 + H: the hour of T0 goes.
    let now = T0 + 3 * H + 10;
    let written = t
        .store
        .merge_edges(
            &mut [
                edge("frontend", "orders", Ingress, "/now", now),
                edge("frontend", "orders", Ingress, "/too-old", T0 + 100),
                edge("frontend", "orders", Ingress, "/future", now + 2 * H),
            ],
            now,
            &keep,
        )
        .unwrap();
    assert_eq!(
        written,
        EdgesWritten {
            stored: 1,
            outside_window: 2,
            expired: 1,
            ..EdgesWritten::default()
        }
    );
    assert_eq!(
        rows(&t.store),
        vec![(T0 + H, "/newer".into(), 1), (T0 + 3 * H, "/now".into(), 1)]
    );
}

#[test]
fn the_row_bound_deletes_the_oldest_hours_first() {
    let t = temp_store("bound");
    let keep = retention(24, 3);
    let at = |hour: u64, path: &str| edge("frontend", "orders", Ingress, path, T0 + hour * H);
    t.store
        .merge_edges(&mut [at(0, "/a"), at(0, "/b"), at(1, "/c")], T0 + H, &keep)
        .unwrap();
    assert_eq!(rows(&t.store).len(), 3);

    // One row over: the whole oldest hour goes, not just one of its rows.
    let written = t
        .store
        .merge_edges(&mut [at(1, "/d")], T0 + H, &keep)
        .unwrap();
    assert_eq!(written.evicted, 2);
    assert_eq!(
        rows(&t.store),
        vec![(T0 + H, "/c".into(), 1), (T0 + H, "/d".into(), 1)]
    );

    // One hour alone over the bound: older hours go, then it is trimmed to the bound.
    let mut new_hour: Vec<Edge> = ["/e", "/f", "/g", "/h", "/i"]
        .iter()
        .map(|p| at(2, p))
        .collect();
    let written = t
        .store
        .merge_edges(&mut new_hour, T0 + 2 * H, &keep)
        .unwrap();
    assert_eq!(written.stored, 5);
    assert_eq!(written.evicted, 4);
    let left = rows(&t.store);
    assert_eq!(left.len(), 3);
    assert!(left.iter().all(|(hour, _, _)| *hour == T0 + 2 * H));
}

/// `n` requests from the frontend to orders, each on its own word-like path.
fn words(n: usize, at: u64) -> Vec<Edge> {
    (0..n)
        .map(|i| edge("frontend", "orders", Ingress, &format!("/wiki/w{i:05}"), at))
        .collect()
}

fn paths_of(store: &Store) -> std::collections::BTreeSet<String> {
    rows(store).into_iter().map(|(_, p, _)| p).collect()
}

#[test]
fn an_edge_keeps_its_bound_of_paths_and_counts_the_rest_into_its_catch_all() {
    let t = temp_store("paths");
    let keep = FlowRetention {
        max_paths_per_edge: 8,
        ..retention(24, 1000)
    };
    let mut first = words(5, T0);
    t.store.merge_edges(&mut first, T0, &keep).unwrap();
    let mut more = words(20, T0 + 10);
    // Another edge of the same workload (another method) has a bound of its own.
    let mut post = edge("frontend", "orders", Ingress, "/wiki/new", T0 + 10);
    post.key.method = Some("POST".into());
    more.push(post);
    let written = t.store.merge_edges(&mut more, T0 + 20, &keep).unwrap();
    assert_eq!(written.stored, 21);
    assert_eq!(
        written.folded, 12,
        "20 paths, 8 kept: the 5 known and 3 new"
    );
    let folded: Vec<&str> = more
        .iter()
        .filter_map(|e| e.key.path.as_deref())
        .filter(|p| *p == "/*")
        .collect();
    assert_eq!(folded.len(), 12, "the report's edges say what was stored");
    let paths = paths_of(&t.store);
    assert_eq!(paths.len(), 8 + 1 + 1, "{paths:?}");
    assert!(paths.contains("/*") && paths.contains("/wiki/new"));
    let edges = t.store.edges_since(0).unwrap();
    let catch_all = edges
        .iter()
        .find(|e| e.key.path.as_deref() == Some("/*"))
        .unwrap();
    assert_eq!(
        catch_all.stats.count, 12,
        "no request is lost, only its path"
    );

    // Known paths still count on their own; new ones keep folding.
    let mut again = vec![
        edge("frontend", "orders", Ingress, "/wiki/w00001", T0 + 30),
        edge("frontend", "orders", Ingress, "/wiki/zzz", T0 + 30),
    ];
    let written = t.store.merge_edges(&mut again, T0 + 40, &keep).unwrap();
    assert_eq!(written.folded, 1);
    assert_eq!(again[0].key.path.as_deref(), Some("/wiki/w00001"));
    assert_eq!(paths_of(&t.store).len(), 10);
}

#[test]
fn a_noisy_workload_loses_its_own_oldest_rows_not_the_others() {
    let t = temp_store("per-workload");
    let keep = FlowRetention {
        max_rows_per_workload: 10,
        max_paths_per_edge: 1000,
        ..retention(24, 1000)
    };
    let quiet = |path: &str, hour: u64| edge("admin", "payments", Ingress, path, T0 + hour * H);
    t.store
        .merge_edges(&mut [quiet("/a", 0), quiet("/b", 0)], T0, &keep)
        .unwrap();
    // The noisy one: 6 rows in hour 1, then 8 in hour 2.
    t.store
        .merge_edges(&mut words(6, T0 + H), T0 + H, &keep)
        .unwrap();
    let mut later: Vec<Edge> = (0..8)
        .map(|i| {
            edge(
                "frontend",
                "orders",
                Ingress,
                &format!("/later/x{i}"),
                T0 + 2 * H,
            )
        })
        .collect();
    let written = t.store.merge_edges(&mut later, T0 + 2 * H, &keep).unwrap();
    assert_eq!((written.evicted_in_workload, written.evicted), (6, 0));
    let left = rows(&t.store);
    assert_eq!(
        left.iter().filter(|r| r.1.starts_with("/later/")).count(),
        8
    );
    assert!(
        !left.iter().any(|r| r.1.starts_with("/wiki/")),
        "the noisy one's oldest hour went"
    );
    assert_eq!(
        left.iter().filter(|r| r.1 == "/a" || r.1 == "/b").count(),
        2,
        "the quiet workload's older rows stay"
    );
    // One hour alone over the bound is trimmed to it.
    let mut burst: Vec<Edge> = (0..15)
        .map(|i| {
            edge(
                "frontend",
                "orders",
                Ingress,
                &format!("/burst/y{i:02}"),
                T0 + 2 * H,
            )
        })
        .collect();
    let written = t.store.merge_edges(&mut burst, T0 + 2 * H, &keep).unwrap();
    assert_eq!(written.evicted_in_workload, 13);
    let orders = rows(&t.store).len() - 2;
    assert_eq!(orders, 10);
}

#[test]
fn freed_rows_free_their_paths_and_the_window_moves_on() {
    let t = temp_store("free");
    let keep = FlowRetention {
        max_paths_per_edge: 4,
        ..retention(2, 1000)
    };
    t.store.merge_edges(&mut words(4, T0), T0, &keep).unwrap();
    // Three hours on, the first hour left the window: its templates went with it, so
    // the edge may hold new ones again.
    let now = T0 + 3 * H;
    let mut fresh: Vec<Edge> = (0..4)
        .map(|i| edge("frontend", "orders", Ingress, &format!("/new/{i}x"), now))
        .collect();
    let written = t.store.merge_edges(&mut fresh, now, &keep).unwrap();
    assert_eq!((written.expired, written.folded), (4, 0));
    assert_eq!(paths_of(&t.store).len(), 4);
}

#[test]
fn edges_stored_before_the_per_workload_tables_are_moved_on_open() {
    let dir = TempDir::new("store-legacy-edges");
    let path = dir.path().join("state.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut legacy = txn.open_table(LEGACY_EDGES).unwrap();
            let e = edge("frontend", "orders", Ingress, "/a", T0 + 5);
            let key = serde_json::to_string(&e.key).unwrap();
            let stats = serde_json::to_string(&e.stats).unwrap();
            legacy.insert((T0, key.as_str()), stats.as_str()).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(rows(&store), vec![(T0, "/a".into(), 1)]);
    // The old table is gone: opening again moves nothing twice.
    drop(store);
    let store = Store::open(&path).unwrap();
    assert_eq!(rows(&store).len(), 1);
}
