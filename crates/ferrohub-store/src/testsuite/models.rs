//! Model repository tests: a model is stored once and never changed, repeated uploads are
//! accepted, listing is by id, deletion is by id.

use crate::{Result, Store, StoreError, Timestamp};

pub async fn models_are_immutable_once_stored<S: Store + Clone>(store: &S) -> Result<()> {
    assert_eq!(store.get_model("dtmi:x:A;1").await?, None);
    assert!(store.list_models().await?.is_empty());
    let t1 = Timestamp::from_unix_ms(1_000);
    let a = store
        .put_model("dtmi:x:A;1", r#"{"a":1}"#.into(), t1)
        .await?;
    assert_eq!(
        (a.id.as_str(), a.doc.as_str(), a.created),
        ("dtmi:x:A;1", r#"{"a":1}"#, t1)
    );
    // The same document again: accepted, and the first time of storing stays.
    let again = store
        .put_model(
            "dtmi:x:A;1",
            r#"{"a":1}"#.into(),
            Timestamp::from_unix_ms(2_000),
        )
        .await?;
    assert_eq!(again, a);
    // Another document under the id: refused, nothing written.
    assert!(matches!(
        store
            .put_model(
                "dtmi:x:A;1",
                r#"{"a":2}"#.into(),
                Timestamp::from_unix_ms(3_000)
            )
            .await,
        Err(StoreError::AlreadyExists)
    ));
    assert_eq!(store.get_model("dtmi:x:A;1").await?, Some(a.clone()));
    // Ids are case-sensitive, as DTMIs are.
    assert_eq!(store.get_model("dtmi:x:a;1").await?, None);

    let b = store
        .put_model("dtmi:x:B;1", r#"{"b":1}"#.into(), t1)
        .await?;
    let c = store
        .put_model("dtmi:w:C;1", r#"{"c":1}"#.into(), t1)
        .await?;
    assert_eq!(store.list_models().await?, vec![c.clone(), a.clone(), b]);

    store.delete_model("dtmi:x:B;1").await?;
    assert!(matches!(
        store.delete_model("dtmi:x:B;1").await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.list_models().await?, vec![c, a]);
    Ok(())
}
