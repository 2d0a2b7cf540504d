//! What a storage routing endpoint writes: IoT Hub's file naming (`{iothub}/{partition}/{YYYY}/
//! {MM}/{DD}/{HH}/{mm}`, every token required), its record format in Avro (IoT Hub's default,
//! the `Microsoft.Azure.Devices.Message` schema) and in JSON lines, with the system properties
//! under the names IoT Hub gives them for storage, and the durable write of one batch file.
//! The delivery task (batching by time window or size, the cursor) decides when a batch is cut;
//! this module says what it looks like on disk, and [`StorageWriter`] writes it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use apache_avro::types::{Record, Value as AvroValue};
use apache_avro::{Codec, Schema, Writer};
use base64::Engine;
use ferrohub_store::telemetry::EventRecord;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use time::OffsetDateTime;

use crate::delivery::{EndpointSender, SendFailure};

/// IoT Hub's default file name format.
pub const DEFAULT_FILE_NAME_FORMAT: &str = "{iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}";

/// The tokens a file name format must contain, each once (IoT Hub refuses a format missing one).
const TOKENS: [&str; 7] = [
    "{iothub}",
    "{partition}",
    "{YYYY}",
    "{MM}",
    "{DD}",
    "{HH}",
    "{mm}",
];

/// The schema IoT Hub writes storage Avro files with.
const AVRO_SCHEMA: &str = r#"{
  "type": "record",
  "name": "Message",
  "namespace": "Microsoft.Azure.Devices",
  "fields": [
    {"name": "EnqueuedTimeUtc", "type": "string"},
    {"name": "Properties", "type": {"type": "map", "values": ["long", "double", "string", "bytes"]}},
    {"name": "SystemProperties", "type": {"type": "map", "values": ["long", "double", "string", "bytes"]}},
    {"name": "Body", "type": ["null", "bytes"]}
  ]
}"#;

/// How a storage endpoint encodes its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// IoT Hub's `Avro`: uncompressed blocks.
    #[default]
    #[serde(alias = "Avro", alias = "AVRO")]
    Avro,
    /// IoT Hub's `AvroDeflate`: deflate-compressed blocks (smaller files, more CPU).
    #[serde(alias = "AvroDeflate", alias = "AVRODEFLATE")]
    Avrodeflate,
    #[serde(alias = "JSON", alias = "Json")]
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageFormatError {
    #[error("file name format {format:?}: {why}")]
    FileNameFormat { format: String, why: String },
    #[error("encoding Avro: {0}")]
    Avro(String),
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Checks a file name format: every token exactly once, a relative path that stays inside the
/// endpoint's directory (no `..`, no absolute path, no empty segment).
pub fn check_file_name_format(format: &str) -> Result<(), StorageFormatError> {
    let bad = |why: String| StorageFormatError::FileNameFormat {
        format: format.to_owned(),
        why,
    };
    for token in TOKENS {
        match format.matches(token).count() {
            1 => {}
            0 => return Err(bad(format!("it must contain {token}"))),
            _ => return Err(bad(format!("{token} appears more than once"))),
        }
    }
    if format.starts_with('/') || format.contains('\\') {
        return Err(bad("it must be a relative path with / separators".into()));
    }
    if format
        .split('/')
        .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        return Err(bad(
            "no path segment may be empty, `.` or `..` (files stay in the endpoint's directory)"
                .into(),
        ));
    }
    Ok(())
}

/// The relative path of the batch of `partition` cut at `time` (UTC), from a checked format.
/// The hub name is reduced to characters safe in a file name.
pub fn file_name(format: &str, hub: &str, partition: u32, time: OffsetDateTime) -> PathBuf {
    let hub: String = hub
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = format
        .replace("{iothub}", &hub)
        .replace("{partition}", &partition.to_string())
        .replace("{YYYY}", &format!("{:04}", time.year()))
        .replace("{MM}", &format!("{:02}", u8::from(time.month())))
        .replace("{DD}", &format!("{:02}", time.day()))
        .replace("{HH}", &format!("{:02}", time.hour()))
        .replace("{mm}", &format!("{:02}", time.minute()));
    PathBuf::from(name)
}

/// A system property's name in storage files, as IoT Hub's table of names per endpoint type
/// gives it; properties the table does not list keep their own name.
pub fn storage_property_name(name: &str) -> &str {
    match name {
        "message-id" => "messageId",
        "user-id" => "userId",
        "iothub-connection-device-id" => "connectionDeviceId",
        "iothub-connection-module-id" => "connectionModuleId",
        "iothub-connection-auth-generation-id" => "connectionDeviceGenerationId",
        "iothub-connection-auth-method" => "connectionAuthMethod",
        "content-type" => "contentType",
        "content-encoding" => "contentEncoding",
        "iothub-enqueuedtime" => "enqueuedTime",
        "correlation-id" => "correlationId",
        other => other,
    }
}

/// As IoT Hub writes it: UTC with seven fractional digits.
fn enqueued_time_utc(record: &EventRecord) -> String {
    let nanos = i128::from(record.event.enqueued_ms) * 1_000_000;
    let t = OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    crate::timefmt::iso(t)
}

fn system_properties(record: &EventRecord) -> BTreeMap<String, String> {
    record
        .event
        .system_properties
        .iter()
        .map(|(k, v)| (storage_property_name(k).to_owned(), v.clone()))
        .collect()
}

fn application_properties(record: &EventRecord) -> BTreeMap<String, String> {
    record
        .event
        .properties
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().unwrap_or_default()))
        .collect()
}

/// Whether IoT Hub would store the body as JSON: declared `application/json` in UTF-8.
fn body_is_json(record: &EventRecord) -> bool {
    let sp = &record.event.system_properties;
    let ct = sp.get("content-type").map(|s| s.to_ascii_lowercase());
    let ce = sp.get("content-encoding").map(|s| s.to_ascii_lowercase());
    ct.as_deref()
        .is_some_and(|c| c.split(';').next().map(str::trim) == Some("application/json"))
        && matches!(ce.as_deref(), Some("utf-8") | Some("utf8"))
}

/// One Avro container file holding `records`, in IoT Hub's schema.
pub fn encode_avro(records: &[EventRecord], deflate: bool) -> Result<Vec<u8>, StorageFormatError> {
    let schema =
        Schema::parse_str(AVRO_SCHEMA).map_err(|e| StorageFormatError::Avro(e.to_string()))?;
    let mut writer = Writer::with_codec(
        &schema,
        Vec::new(),
        if deflate {
            Codec::Deflate(apache_avro::DeflateSettings::default())
        } else {
            Codec::Null
        },
    );
    let as_map = |m: BTreeMap<String, String>| {
        AvroValue::Map(
            m.into_iter()
                .map(|(k, v)| (k, AvroValue::Union(2, Box::new(AvroValue::String(v)))))
                .collect(),
        )
    };
    for r in records {
        let mut rec = Record::new(writer.schema())
            .ok_or_else(|| StorageFormatError::Avro("the schema is not a record".into()))?;
        rec.put("EnqueuedTimeUtc", enqueued_time_utc(r));
        rec.put("Properties", as_map(application_properties(r)));
        rec.put("SystemProperties", as_map(system_properties(r)));
        rec.put(
            "Body",
            AvroValue::Union(1, Box::new(AvroValue::Bytes(r.event.body.clone()))),
        );
        writer
            .append(rec)
            .map_err(|e| StorageFormatError::Avro(e.to_string()))?;
    }
    writer
        .into_inner()
        .map_err(|e| StorageFormatError::Avro(e.to_string()))
}

/// One JSON document per line per record, in the shape of IoT Hub's JSON storage encoding:
/// the body as JSON when declared JSON in UTF-8 (and parseable), otherwise base64.
pub fn encode_json_lines(records: &[EventRecord]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        let body = if body_is_json(r) {
            serde_json::from_slice::<Value>(&r.event.body).ok()
        } else {
            None
        }
        .unwrap_or_else(|| {
            Value::String(base64::engine::general_purpose::STANDARD.encode(&r.event.body))
        });
        let to_obj = |m: BTreeMap<String, String>| -> Map<String, Value> {
            m.into_iter().map(|(k, v)| (k, Value::String(v))).collect()
        };
        let line = json!({
            "EnqueuedTimeUtc": enqueued_time_utc(r),
            "Properties": to_obj(application_properties(r)),
            "SystemProperties": to_obj(system_properties(r)),
            "Body": body,
        });
        out.extend_from_slice(line.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

/// The encoded batch in `encoding`.
pub fn encode(encoding: Encoding, records: &[EventRecord]) -> Result<Vec<u8>, StorageFormatError> {
    match encoding {
        Encoding::Avro => encode_avro(records, false),
        Encoding::Avrodeflate => encode_avro(records, true),
        Encoding::Json => Ok(encode_json_lines(records)),
    }
}

/// Writes `bytes` as `root/relative` durably: into a temporary file beside it, fsync'd, renamed
/// into place, and the directory fsync'd, so a crash leaves either no file or the whole one.
/// When the name is taken (a second batch cut within the same minute), `-1`, `-2`, ... is
/// appended. Returns the path written. Blocking: call it from a blocking task.
pub fn write_batch(
    root: &Path,
    relative: &Path,
    bytes: &[u8],
) -> Result<PathBuf, StorageFormatError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StorageFormatError::Io { path, source }
    };
    // The format was checked, but the path is joined under root only if it stays there.
    if relative
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(StorageFormatError::FileNameFormat {
            format: relative.display().to_string(),
            why: "the file name leaves the endpoint's directory".into(),
        });
    }
    let target = root.join(relative);
    let dir = target.parent().unwrap_or(root).to_path_buf();
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let mut path = target.clone();
    let mut n = 0u32;
    while path.exists() {
        n += 1;
        let mut name = target.file_name().unwrap_or_default().to_os_string();
        name.push(format!("-{n}"));
        path = target.with_file_name(name);
    }
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io(&dir))?;
    Ok(path)
}

/// Writes each batch the delivery task hands it as one file under `dir` (the endpoint's
/// container directory). The batch comes from the endpoint's one-partition stream, so
/// `{partition}` is 0; the time tokens are the enqueued time of the batch's first message.
#[derive(Debug, Clone)]
pub struct StorageWriter {
    pub dir: PathBuf,
    pub hub: String,
    pub file_name_format: String,
    pub encoding: Encoding,
}

#[async_trait::async_trait]
impl EndpointSender for StorageWriter {
    async fn send(&self, batch: &[EventRecord]) -> Result<(), SendFailure> {
        let Some(first) = batch.first() else {
            return Ok(());
        };
        let nanos = i128::from(first.event.enqueued_ms) * 1_000_000;
        let time =
            OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let relative = file_name(&self.file_name_format, &self.hub, 0, time);
        let bytes = encode(self.encoding, batch).map_err(|e| SendFailure::new(e.to_string()))?;
        let dir = self.dir.clone();
        // Encoding is CPU work worth keeping off a busy runtime thread only for big batches;
        // the write and its fsyncs always block.
        tokio::task::spawn_blocking(move || write_batch(&dir, &relative, &bytes))
            .await
            .map_err(|e| SendFailure::new(format!("the file writer stopped: {e}")))?
            .map_err(|e| SendFailure::new(e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::Reader;
    use ferrohub_store::telemetry::NewEvent;
    use time::macros::datetime;

    fn record(seq: u64, body: &[u8], json_body: bool) -> EventRecord {
        let mut sp = BTreeMap::from([
            ("message-id".to_string(), format!("m{seq}")),
            (
                "iothub-connection-device-id".to_string(),
                "dev1".to_string(),
            ),
            (
                "iothub-enqueuedtime".to_string(),
                "2026-12-01T10:00:00.000Z".to_string(),
            ),
            ("dt-subject".to_string(), "thermostat1".to_string()),
        ]);
        if json_body {
            sp.insert("content-type".into(), "application/json".into());
            sp.insert("content-encoding".into(), "utf-8".into());
        }
        EventRecord {
            partition: 1,
            sequence: seq,
            event: NewEvent {
                device_id: "dev1".into(),
                module_id: None,
                enqueued_ms: 1_796_119_200_000 + seq as i64,
                system_properties: sp,
                properties: vec![("level".into(), Some("info".into())), ("flag".into(), None)],
                body: body.to_vec(),
            },
        }
    }

    #[test]
    fn file_name_formats_need_every_token_once_and_stay_inside() {
        assert!(check_file_name_format(DEFAULT_FILE_NAME_FORMAT).is_ok());
        assert!(check_file_name_format("{YYYY}-{MM}-{DD}/{HH}{mm}/{iothub}-{partition}").is_ok());
        for bad in [
            "{iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}",
            "{iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}/{mm}",
            "/{iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}",
            "../{iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}",
            "{iothub}//{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}",
            "{iothub}\\{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}",
        ] {
            assert!(check_file_name_format(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn file_names_fill_the_tokens_in_utc() {
        let t = datetime!(2026-03-04 05:06:59 UTC);
        assert_eq!(
            file_name(DEFAULT_FILE_NAME_FORMAT, "my hub/1", 3, t),
            PathBuf::from("my_hub_1/3/2026/03/04/05/06")
        );
    }

    #[test]
    fn avro_files_are_read_back_by_the_avro_reader_in_iot_hubs_schema(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let records = [
            record(1, b"\x00\xffbinary", false),
            record(2, br#"{"t":1}"#, true),
        ];
        let bytes = encode_avro(&records, true)?;
        let reader = Reader::new(&bytes[..])?;
        assert_eq!(reader.writer_schema(), &Schema::parse_str(AVRO_SCHEMA)?);
        let values: Vec<AvroValue> = reader.collect::<Result<_, _>>()?;
        assert_eq!(values.len(), 2);
        let AvroValue::Record(fields) = &values[0] else {
            return Err("not a record".into());
        };
        let field = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            field("EnqueuedTimeUtc"),
            Some(AvroValue::String("2026-12-01T10:00:00.0010000Z".into()))
        );
        assert_eq!(
            field("Body"),
            Some(AvroValue::Union(
                1,
                Box::new(AvroValue::Bytes(b"\x00\xffbinary".to_vec()))
            ))
        );
        let Some(AvroValue::Map(sp)) = field("SystemProperties") else {
            return Err("no system properties".into());
        };
        let s = |v: &str| AvroValue::Union(2, Box::new(AvroValue::String(v.into())));
        assert_eq!(sp.get("connectionDeviceId"), Some(&s("dev1")));
        assert_eq!(sp.get("messageId"), Some(&s("m1")));
        assert_eq!(sp.get("enqueuedTime"), Some(&s("2026-12-01T10:00:00.000Z")));
        assert_eq!(sp.get("dt-subject"), Some(&s("thermostat1")));
        let Some(AvroValue::Map(p)) = field("Properties") else {
            return Err("no properties".into());
        };
        assert_eq!(p.get("level"), Some(&s("info")));
        assert_eq!(p.get("flag"), Some(&s("")));
        Ok(())
    }

    #[test]
    fn json_lines_carry_json_bodies_as_json_and_others_as_base64(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let out = encode_json_lines(&[record(1, b"raw", false), record(2, br#"{"t":1}"#, true)]);
        let lines: Vec<Value> = out
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(serde_json::from_slice)
            .collect::<Result<_, _>>()?;
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["Body"], "cmF3");
        assert_eq!(lines[1]["Body"], json!({"t": 1}));
        assert_eq!(
            lines[1]["SystemProperties"]["contentType"],
            "application/json"
        );
        assert_eq!(lines[0]["Properties"]["level"], "info");
        Ok(())
    }

    #[test]
    fn batches_are_written_whole_and_never_over_another() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let rel = file_name(
            DEFAULT_FILE_NAME_FORMAT,
            "hub",
            0,
            datetime!(2026-12-01 10:00 UTC),
        );
        let first = write_batch(dir.path(), &rel, b"one")?;
        let second = write_batch(dir.path(), &rel, b"two")?;
        assert_eq!(first, dir.path().join("hub/0/2026/12/01/10/00"));
        assert_eq!(second, dir.path().join("hub/0/2026/12/01/10/00-1"));
        assert_eq!(std::fs::read(&first)?, b"one");
        assert_eq!(std::fs::read(&second)?, b"two");
        let leftovers: Vec<_> = std::fs::read_dir(first.parent().ok_or("parent")?)?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        assert!(write_batch(dir.path(), Path::new("../escape"), b"x").is_err());
        Ok(())
    }
}
