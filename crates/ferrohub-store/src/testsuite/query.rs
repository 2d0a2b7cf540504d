//! Query scans (`QueryStore`): key order and keyset paging over devices and modules, rows
//! carrying their identity and twin, and prefilters that never leave out a row they hold for
//! (rows without a stored twin pass twin conditions; an engine may return more).

use serde_json::json;

use crate::query::{
    CompareOp, Field, Prefilter, Scalar, ScanKind, ScannedIdentity, TwinRow, TwinScan,
};
use crate::{Module, QueryStore, Result, Store};

use super::device;

fn scan(kind: ScanKind, filter: Prefilter, after: Option<(&str, &str)>, limit: usize) -> TwinScan {
    TwinScan {
        kind,
        filter,
        after: after.map(|(d, m)| (d.to_string(), m.to_string())),
        limit,
        with_twins: true,
    }
}

fn keys(rows: &[TwinRow]) -> Vec<(String, String)> {
    rows.iter().map(TwinRow::key).collect()
}

fn twin_path(p: &[&str]) -> Field {
    Field::Twin(p.iter().map(|s| s.to_string()).collect())
}

/// The keys of rows that truly satisfy `f` by the prefilter rules: a test's own check of an
/// engine's answer, which may hold more.
async fn holds<S: QueryStore>(store: &S, f: Prefilter, expected: &[&str]) -> Result<()> {
    let rows = store
        .scan_twins(&scan(ScanKind::Devices, f.clone(), None, 100))
        .await?;
    let got: Vec<String> = rows.iter().map(|r| r.key().0).collect();
    for e in expected {
        assert!(got.iter().any(|g| g == e), "{f:?} left out {e}: {got:?}");
    }
    Ok(())
}

pub async fn scans_page_in_key_order_and_keep_every_matching_row<S: Store + Clone>(
    store: &S,
) -> Result<()> {
    for id in ["c", "a", "d", "b"] {
        store.create_device(device(id)).await?;
    }
    store
        .create_module(Module {
            module_id: "m2".into(),
            device_id: "a".into(),
            ..Default::default()
        })
        .await?;
    store
        .create_module(Module {
            module_id: "m1".into(),
            device_id: "a".into(),
            ..Default::default()
        })
        .await?;
    let doc = |site: &str, n: i64| json!({"tags": {"site": site, "n": n}}).to_string();
    store.put_twin("a", None, doc("x", 1), None).await?;
    store.put_twin("b", None, doc("y", 2), None).await?;
    store.put_twin("c", None, doc("x", 3), None).await?;
    // "d" has no stored twin.
    store.put_twin("a", Some("m1"), doc("x", 9), None).await?;

    let all = store
        .scan_twins(&scan(ScanKind::Devices, Prefilter::All, None, 100))
        .await?;
    assert_eq!(
        keys(&all),
        [("a", ""), ("b", ""), ("c", ""), ("d", "")].map(|(d, m)| (d.to_string(), m.to_string()))
    );
    assert!(
        matches!(&all[0].identity, ScannedIdentity::Device(d) if d.device_id == "a" && !d.etag.is_empty())
    );
    assert!(all[0]
        .twin
        .as_ref()
        .is_some_and(|t| t.doc.contains("\"x\"")));
    assert!(all[3].twin.is_none());

    // Keyset pages: after a key, at most a limit.
    let page = store
        .scan_twins(&scan(ScanKind::Devices, Prefilter::All, Some(("a", "")), 2))
        .await?;
    assert_eq!(keys(&page).len(), 2);
    assert_eq!(page[0].key().0, "b");
    let rest = store
        .scan_twins(&scan(ScanKind::Devices, Prefilter::All, Some(("c", "")), 2))
        .await?;
    assert_eq!(keys(&rest), [("d".to_string(), String::new())]);
    let without = store
        .scan_twins(&TwinScan {
            with_twins: false,
            ..scan(ScanKind::Devices, Prefilter::All, None, 10)
        })
        .await?;
    assert!(without.iter().all(|r| r.twin.is_none()));

    let modules = store
        .scan_twins(&scan(ScanKind::Modules, Prefilter::All, None, 10))
        .await?;
    assert_eq!(
        keys(&modules),
        [
            ("a".to_string(), "m1".to_string()),
            ("a".to_string(), "m2".to_string())
        ]
    );
    let after = store
        .scan_twins(&scan(
            ScanKind::Modules,
            Prefilter::All,
            Some(("a", "m1")),
            10,
        ))
        .await?;
    assert_eq!(keys(&after), [("a".to_string(), "m2".to_string())]);

    let site = twin_path(&["tags", "site"]);
    let n = twin_path(&["tags", "n"]);
    holds(
        store,
        Prefilter::Compare(site.clone(), CompareOp::Eq, Scalar::Str("x".into())),
        &["a", "c", "d"],
    )
    .await?;
    holds(
        store,
        Prefilter::Compare(n.clone(), CompareOp::Ge, Scalar::Int(2)),
        &["b", "c", "d"],
    )
    .await?;
    holds(
        store,
        Prefilter::Compare(n.clone(), CompareOp::Lt, Scalar::Float(1.5)),
        &["a", "d"],
    )
    .await?;
    holds(
        store,
        Prefilter::StartsWith(Field::DeviceId, "c".into()),
        &["c"],
    )
    .await?;
    holds(
        store,
        Prefilter::StartsWith(site.clone(), "y".into()),
        &["b", "d"],
    )
    .await?;
    holds(
        store,
        Prefilter::Defined(twin_path(&["tags", "n"])),
        &["a", "b", "c", "d"],
    )
    .await?;
    holds(
        store,
        Prefilter::Or(vec![
            Prefilter::Compare(n.clone(), CompareOp::Eq, Scalar::Int(1)),
            Prefilter::Compare(Field::DeviceId, CompareOp::Eq, Scalar::Str("b".into())),
        ]),
        &["a", "b", "d"],
    )
    .await?;
    holds(
        store,
        Prefilter::And(vec![
            Prefilter::Compare(site, CompareOp::Eq, Scalar::Str("x".into())),
            Prefilter::Compare(
                Field::Identity(vec!["status".into()]),
                CompareOp::Eq,
                Scalar::Str("enabled".into()),
            ),
        ]),
        &["a", "c", "d"],
    )
    .await?;
    // A prefilter narrows: an engine that checks it leaves out what cannot match.
    let narrowed = store
        .scan_twins(&scan(
            ScanKind::Devices,
            Prefilter::Compare(Field::DeviceId, CompareOp::Eq, Scalar::Str("b".into())),
            None,
            10,
        ))
        .await?;
    assert!(narrowed.iter().any(|r| r.key().0 == "b"));
    let m = store
        .scan_twins(&scan(
            ScanKind::Modules,
            Prefilter::Compare(n, CompareOp::Eq, Scalar::Int(9)),
            None,
            10,
        ))
        .await?;
    assert!(
        m.iter()
            .any(|r| r.key() == ("a".to_string(), "m1".to_string())),
        "{m:?}"
    );
    Ok(())
}
