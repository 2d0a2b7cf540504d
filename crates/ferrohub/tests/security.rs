//! Promises of SECURITY.md that no other test holds: TLS below 1.2 is refused on both
//! listeners, and the files holding keys are readable by their owner only.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A ClientHello that offers at most `version` (0x0301 TLS 1.0, 0x0302 TLS 1.1, 0x0303 TLS
/// 1.2), with no `supported_versions` extension (which TLS 1.3 needs).
fn client_hello(version: u16) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&version.to_be_bytes());
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // no session id
                  // Suites the hub has (ECDHE with AES-GCM), so only the version can be what it refuses.
    let suites: [u16; 6] = [0xc02b, 0xc02f, 0xc02c, 0xc030, 0xc013, 0x002f];
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // compression: null
    let host = HOST.as_bytes();
    let mut sni = Vec::new();
    sni.extend_from_slice(&((host.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&(host.len() as u16).to_be_bytes());
    sni.extend_from_slice(host);
    let mut ext = Vec::new();
    ext.extend_from_slice(&0u16.to_be_bytes()); // server_name
    ext.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    ext.extend_from_slice(&sni);
    let mut put = |id: u16, data: &[u8]| {
        ext.extend_from_slice(&id.to_be_bytes());
        ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
        ext.extend_from_slice(data);
    };
    put(10, &[0, 4, 0x00, 0x1d, 0x00, 0x17]); // supported_groups: x25519, secp256r1
    put(11, &[1, 0]); // ec_point_formats: uncompressed
    put(13, &[0, 6, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01]); // signature_algorithms
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);

    let mut hs = vec![1u8]; // ClientHello
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut record = vec![22u8, 0x03, 0x01]; // handshake, record version TLS 1.0
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    record
}

/// What the server answers a ClientHello for `version`: the first record's content type and,
/// for an alert, its description.
async fn answer_to(addr: SocketAddr, version: u16) -> R<(u8, Option<u8>)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&client_hello(version)).await?;
    let mut head = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head)).await??;
    if head[0] != 21 {
        return Ok((head[0], None));
    }
    let mut alert = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut alert)).await??;
    Ok((head[0], Some(alert[1])))
}

#[tokio::test]
async fn tls_1_0_and_1_1_are_refused_with_a_protocol_version_alert_on_both_listeners() -> TestResult
{
    let hub = TestHub::start().await?;
    for addr in [hub.mqtt_addr(), hub.https_addr()] {
        for version in [0x0301, 0x0302] {
            // 21: alert; 70: protocol_version.
            assert_eq!(
                answer_to(addr, version).await?,
                (21, Some(70)),
                "{addr} offered {version:#06x}"
            );
        }
        // The same hello offering TLS 1.2 gets a ServerHello (22: handshake), so the refusals
        // above are about the version and not the hand-made hello.
        assert_eq!(answer_to(addr, 0x0303).await?.0, 22, "{addr} TLS 1.2");
    }
    hub.stop().await;
    Ok(())
}

#[cfg(unix)]
#[tokio::test]
async fn files_holding_keys_are_readable_by_their_owner_only() -> TestResult {
    use std::os::unix::fs::PermissionsExt;
    let hub = TestHub::start().await?;
    let dir = hub.dir.path().to_path_buf();
    let mut checked = 0;
    // hub.json holds the owner policy's key; the .key files the CA's and the server's.
    let mut files = vec![dir.join("hub.json")];
    for entry in std::fs::read_dir(dir.join("certs"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "key") {
            files.push(path);
        }
    }
    for f in &files {
        let mode = std::fs::metadata(f)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
        checked += 1;
    }
    assert!(
        checked >= 3,
        "hub.json and two keys expected, saw {files:?}"
    );
    hub.stop().await;
    Ok(())
}
