//! The web explorer's back end over real TLS: its embedded files and security headers, sign-in
//! by login token and by connection string, the session cookie and CSRF rules, the REST proxy
//! (rights enforced by the API, ETags, a streamed `/events`), sign-out, the overview counters
//! and the `ferrohub explorer` command.

mod common;

use common::*;
use reqwest::{header, Method, StatusCode};
use serde_json::{json, Value};

/// A client that trusts the hub's CA and keeps no cookies of its own: tests pass the session
/// cookie by hand, to see exactly what the hub set.
fn client(hub: &TestHub) -> R<reqwest::Client> {
    https_client(hub)
}

fn base(hub: &TestHub) -> String {
    format!("https://{HOST}:{}", hub.https_addr().port())
}

/// The login token in the start-up URL's fragment.
fn startup_token(hub: &TestHub) -> R<String> {
    let url = &hub.server().info.explorer_url;
    let (_, token) = url.split_once("#token=").ok_or("no token in the URL")?;
    Ok(token.to_owned())
}

/// A signed-in browser: the cookie to send and the session's CSRF token.
struct Browser {
    cookie: String,
    csrf: String,
    info: Value,
}

/// Signs in with `body`; returns the status, the Set-Cookie value and the body.
async fn post_session(hub: &TestHub, body: &Value) -> R<(StatusCode, Option<String>, Value)> {
    let resp = client(hub)?
        .post(format!("{}/explorer/api/session", base(hub)))
        .json(body)
        .send()
        .await?;
    let status = resp.status();
    let cookie = resp
        .headers()
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = resp.text().await?;
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok((status, cookie, body))
}

async fn sign_in(hub: &TestHub, body: &Value) -> R<Browser> {
    let (status, cookie, info) = post_session(hub, body).await?;
    if status != StatusCode::OK {
        return Err(format!("sign-in answered {status}: {info}").into());
    }
    let set = cookie.ok_or("no Set-Cookie")?;
    let pair = set.split(';').next().ok_or("empty cookie")?.to_owned();
    let csrf = info["csrfToken"].as_str().ok_or("no csrfToken")?.to_owned();
    Ok(Browser {
        cookie: pair,
        csrf,
        info,
    })
}

async fn owner_session(hub: &TestHub) -> R<Browser> {
    sign_in(hub, &json!({"token": startup_token(hub)?})).await
}

fn policy_connection_string(hub: &TestHub, policy: &str, key: &str) -> String {
    format!(
        "HostName={HOST}:{};SharedAccessKeyName={policy};SharedAccessKey={key}",
        hub.https_addr().port()
    )
}

async fn policy_session(hub: &TestHub, policy: &str) -> R<Browser> {
    let p = hub
        .server()
        .hub
        .policy(policy)
        .await?
        .ok_or("no such policy")?;
    let cs = policy_connection_string(hub, policy, &p.secondary_key);
    sign_in(hub, &json!({"connectionString": cs})).await
}

/// A call under `/explorer/api` as `browser` (or none), with the CSRF token when `csrf` is
/// given, and extra headers.
async fn call(
    hub: &TestHub,
    method: Method,
    path: &str,
    browser: Option<&Browser>,
    csrf: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> R<Answer> {
    let mut req = client(hub)?.request(method, format!("{}{path}", base(hub)));
    if let Some(b) = browser {
        req = req.header(header::COOKIE, &b.cookie);
    }
    if let Some(c) = csrf {
        req = req.header("X-CSRF-Token", c);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok(Answer {
        status,
        headers,
        body,
    })
}

fn assert_security_headers(a: &Answer) {
    let csp = a.header("content-security-policy").unwrap_or_default();
    assert!(csp.contains("default-src 'self'"), "CSP: {csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "CSP: {csp}");
    assert_eq!(a.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(a.header("x-frame-options"), Some("DENY"));
    assert_eq!(a.header("referrer-policy"), Some("no-referrer"));
}

/// IoT Hub's error body with `code`.
fn assert_iothub_error(a: &Answer, code: &str) {
    assert_eq!(a.header("iothub-errorcode"), Some(code), "{:?}", a.body);
    let message = a.body["Message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with(&format!("ErrorCode:{code};")),
        "{message}"
    );
}

#[tokio::test]
async fn files_are_served_embedded_with_security_headers_and_etags() -> TestResult {
    let hub = TestHub::start().await?;
    for path in ["/explorer", "/explorer/"] {
        let a = call(&hub, Method::GET, path, None, None, &[], None).await?;
        assert_eq!(a.status, 200, "{path}");
        assert_eq!(a.header("content-type"), Some("text/html; charset=utf-8"));
        assert_eq!(a.header("cache-control"), Some("no-cache"));
        assert_security_headers(&a);
        assert!(a.body.as_str().unwrap_or_default().contains("<html"));
    }
    let a = call(&hub, Method::GET, "/explorer", None, None, &[], None).await?;
    let etag = a.header("etag").ok_or("no ETag")?.to_owned();
    let again = call(
        &hub,
        Method::GET,
        "/explorer",
        None,
        None,
        &[("If-None-Match", &etag)],
        None,
    )
    .await?;
    assert_eq!(again.status, 304);
    assert_security_headers(&again);
    let file = call(
        &hub,
        Method::GET,
        "/explorer/static/index.html",
        None,
        None,
        &[],
        None,
    )
    .await?;
    assert_eq!(file.status, 200);
    assert_eq!(file.header("etag"), Some(etag.as_str()));
    for missing in [
        "/explorer/static/no/such/file.js",
        "/explorer/static/../Cargo.toml",
        "/explorer/nothing-here",
    ] {
        let a = call(&hub, Method::GET, missing, None, None, &[], None).await?;
        assert_eq!(a.status, 404, "{missing}");
        assert_security_headers(&a);
        assert!(a.body["Message"].is_string(), "IoT Hub's error body");
    }
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_login_token_signs_in_once_and_sign_out_ends_the_session() -> TestResult {
    let hub = TestHub::start().await?;
    let token = startup_token(&hub)?;
    assert!(hub
        .server()
        .info
        .explorer_url
        .starts_with(&format!("{}/explorer/#token=", base(&hub))));
    let (status, cookie, info) = post_session(&hub, &json!({ "token": token })).await?;
    assert_eq!(status, StatusCode::OK, "{info}");
    let cookie = cookie.ok_or("no Set-Cookie")?;
    let (pair, attrs) = cookie.split_once(';').ok_or("no cookie attributes")?;
    let value = pair
        .strip_prefix("ferrohub_session=")
        .ok_or("cookie name")?;
    assert_eq!(value.len(), 43, "256 bits, base64url: {value}");
    for attr in ["Path=/explorer", "HttpOnly", "Secure", "SameSite=Strict"] {
        assert!(
            attrs.split(';').any(|a| a.trim() == attr),
            "{attr} missing: {cookie}"
        );
    }
    assert_eq!(info["policy"], "iothubowner");
    let rights: Vec<&str> = info["rights"]
        .as_array()
        .ok_or("rights")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for r in [
        "RegistryRead",
        "RegistryWrite",
        "ServiceConnect",
        "DeviceConnect",
    ] {
        assert!(rights.contains(&r), "{r} in {rights:?}");
    }
    assert_eq!(info["hostName"], HOST);
    assert_eq!(info["hubName"], "localhost");
    let expires = info["expiresAt"].as_str().ok_or("expiresAt")?;
    time::OffsetDateTime::parse(expires, &time::format_description::well_known::Rfc3339)?;

    // The same token again, and one that never was: refused alike.
    let (again, cookie_again, body) = post_session(&hub, &json!({ "token": token })).await?;
    assert_eq!(again, StatusCode::UNAUTHORIZED, "{body}");
    assert!(cookie_again.is_none());
    assert!(body["Message"]
        .as_str()
        .unwrap_or_default()
        .starts_with("ErrorCode:IotHubUnauthorizedAccess;"));
    let (bad, _, _) = post_session(&hub, &json!({"token": "bm90LWEtdG9rZW4"})).await?;
    assert_eq!(bad, StatusCode::UNAUTHORIZED);
    let (not_json, _, body) = post_session(&hub, &json!(["token"])).await?;
    assert_eq!(not_json, StatusCode::BAD_REQUEST, "{body}");
    let wrong_method = call(
        &hub,
        Method::PUT,
        "/explorer/api/session",
        None,
        None,
        &[],
        None,
    )
    .await?;
    assert_eq!(wrong_method.status, 405);
    assert_iothub_error(&wrong_method, "InvalidOperation");
    assert_security_headers(&wrong_method);

    let browser = Browser {
        cookie: pair.to_owned(),
        csrf: info["csrfToken"].as_str().ok_or("csrf")?.to_owned(),
        info,
    };
    let a = call(
        &hub,
        Method::GET,
        "/explorer/api/session",
        Some(&browser),
        None,
        &[],
        None,
    )
    .await?;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["csrfToken"], browser.csrf.as_str());
    assert_eq!(a.header("cache-control"), Some("no-store"));
    assert_security_headers(&a);

    let no_csrf = call(
        &hub,
        Method::DELETE,
        "/explorer/api/session",
        Some(&browser),
        None,
        &[],
        None,
    )
    .await?;
    assert_eq!(no_csrf.status, 403);
    let out = call(
        &hub,
        Method::DELETE,
        "/explorer/api/session",
        Some(&browser),
        Some(&browser.csrf),
        &[],
        None,
    )
    .await?;
    assert_eq!(out.status, 204);
    let cleared = out.header("set-cookie").unwrap_or_default();
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    let gone = call(
        &hub,
        Method::GET,
        "/explorer/api/session",
        Some(&browser),
        None,
        &[],
        None,
    )
    .await?;
    assert_eq!(gone.status, 401);
    assert_iothub_error(&gone, "IotHubUnauthorizedAccess");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn connection_strings_sign_in_as_their_policy() -> TestResult {
    let hub = TestHub::start().await?;
    let owner = sign_in(
        &hub,
        &json!({"connectionString": hub.server().info.owner_connection_string}),
    )
    .await?;
    assert_eq!(owner.info["policy"], "iothubowner");
    let read = policy_session(&hub, "registryRead").await?;
    assert_eq!(read.info["policy"], "registryRead");
    assert_eq!(read.info["rights"], json!(["RegistryRead"]));

    let wrong_key = policy_connection_string(
        &hub,
        "registryRead",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    );
    let (status, cookie, _) = post_session(&hub, &json!({"connectionString": wrong_key})).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(cookie.is_none());
    let unknown = policy_connection_string(&hub, "nobody", "AAAA");
    let (status, _, _) = post_session(&hub, &json!({"connectionString": unknown})).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = post_session(&hub, &json!({"connectionString": "not one"})).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Signing in again from the same browser ends the session its old cookie named.
    let resp = client(&hub)?
        .post(format!("{}/explorer/api/session", base(&hub)))
        .header(header::COOKIE, &owner.cookie)
        .json(&json!({"connectionString": hub.server().info.owner_connection_string}))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let old = call(
        &hub,
        Method::GET,
        "/explorer/api/session",
        Some(&owner),
        None,
        &[],
        None,
    )
    .await?;
    assert_eq!(old.status, 401);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_proxy_calls_the_api_as_the_sessions_policy() -> TestResult {
    let hub = TestHub::start().await?;
    let owner = owner_session(&hub).await?;
    let read = policy_session(&hub, "registryRead").await?;
    let device = json!({"deviceId": "px"});

    let created = call(
        &hub,
        Method::PUT,
        "/explorer/api/hub/devices/px",
        Some(&owner),
        Some(&owner.csrf),
        &[],
        Some(&device),
    )
    .await?;
    assert_eq!(created.status, 200, "{:?}", created.body);
    assert_eq!(created.body["deviceId"], "px");
    assert_eq!(created.header("cache-control"), Some("no-store"));
    assert_security_headers(&created);

    let list = call(
        &hub,
        Method::GET,
        "/explorer/api/hub/devices",
        Some(&read),
        None,
        &[],
        None,
    )
    .await?;
    assert_eq!(list.status, 200, "{:?}", list.body);
    assert_eq!(list.body[0]["deviceId"], "px");
    let query = call(
        &hub,
        Method::POST,
        "/explorer/api/hub/devices/query",
        Some(&read),
        Some(&read.csrf),
        &[],
        Some(&json!({"query": "SELECT * FROM devices"})),
    )
    .await?;
    assert_eq!(query.status, 200, "{:?}", query.body);
    assert_eq!(query.body[0]["deviceId"], "px");

    // The API itself refuses the read-only policy's write, as it would an SDK's.
    let refused = call(
        &hub,
        Method::PUT,
        "/explorer/api/hub/devices/py",
        Some(&read),
        Some(&read.csrf),
        &[],
        Some(&json!({"deviceId": "py"})),
    )
    .await?;
    assert_eq!(refused.status, 401, "{:?}", refused.body);
    assert_iothub_error(&refused, "IotHubUnauthorizedAccess");

    let anonymous = call(
        &hub,
        Method::GET,
        "/explorer/api/hub/devices",
        None,
        None,
        &[],
        None,
    )
    .await?;
    assert_eq!(anonymous.status, 401);
    for csrf in [None, Some("wrong")] {
        let a = call(
            &hub,
            Method::PUT,
            "/explorer/api/hub/devices/pz",
            Some(&owner),
            csrf,
            &[],
            Some(&json!({"deviceId": "pz"})),
        )
        .await?;
        assert_eq!(a.status, 403, "CSRF {csrf:?}");
        assert_iothub_error(&a, "IotHubUnauthorizedAccess");
    }
    let foreign = call(
        &hub,
        Method::PUT,
        "/explorer/api/hub/devices/pz",
        Some(&owner),
        Some(&owner.csrf),
        &[("Origin", "https://evil.example")],
        Some(&json!({"deviceId": "pz"})),
    )
    .await?;
    assert_eq!(foreign.status, 403);
    let own_origin = base(&hub);
    let same = call(
        &hub,
        Method::PUT,
        "/explorer/api/hub/devices/pz",
        Some(&owner),
        Some(&owner.csrf),
        &[("Origin", &own_origin)],
        Some(&json!({"deviceId": "pz"})),
    )
    .await?;
    assert_eq!(same.status, 200, "{:?}", same.body);
    for hidden in [
        "/explorer/api/hub/$iothub/websocket",
        "/explorer/api/hub/$servicebus/websocket",
        "/explorer/api/hub/0ne00000001/registrations/px/register",
        "/explorer/api/hub/explorer/api/session",
    ] {
        let a = call(&hub, Method::GET, hidden, Some(&owner), None, &[], None).await?;
        assert_eq!(a.status, 404, "{hidden}");
    }

    // ETags pass both ways: a twin patch with the current etag applies, a stale one is 412.
    let twin = call(
        &hub,
        Method::GET,
        "/explorer/api/hub/twins/px",
        Some(&owner),
        None,
        &[],
        None,
    )
    .await?;
    assert_eq!(twin.status, 200);
    let etag = twin
        .header("etag")
        .map(str::to_owned)
        .or_else(|| twin.body["etag"].as_str().map(|e| format!("\"{e}\"")))
        .ok_or("no twin etag")?;
    let patch = json!({"properties": {"desired": {"x": 1}}});
    let applied = call(
        &hub,
        Method::PATCH,
        "/explorer/api/hub/twins/px",
        Some(&owner),
        Some(&owner.csrf),
        &[("If-Match", &etag)],
        Some(&patch),
    )
    .await?;
    assert_eq!(applied.status, 200, "{:?}", applied.body);
    let stale = call(
        &hub,
        Method::PATCH,
        "/explorer/api/hub/twins/px",
        Some(&owner),
        Some(&owner.csrf),
        &[("If-Match", &etag)],
        Some(&patch),
    )
    .await?;
    assert_eq!(stale.status, 412, "{:?}", stale.body);
    assert_iothub_error(&stale, "PreconditionFailed");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn events_stream_through_the_proxy_line_by_line() -> TestResult {
    let hub = TestHub::start().await?;
    let owner = owner_session(&hub).await?;
    let (key, _) = hub.create_device("streamer").await?;
    let mut resp = client(&hub)?
        .get(format!(
            "{}/explorer/api/hub/events?deviceId=streamer&from=end&consumerGroup=$Default",
            base(&hub)
        ))
        .header(header::COOKIE, &owner.cookie)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        Some("application/x-ndjson")
    );
    let (mut device, _) = hub.connect_device("streamer", &key, true).await?;
    device
        .publish_qos1(1, "devices/streamer/messages/events/", b"{\"t\":21}")
        .await?;
    // The response is still open: the line arrives on its own, not at the end of a body.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut pending = Vec::new();
    let line = loop {
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .map_err(|_| "no event line within the wait")??
            .ok_or("the stream ended")?;
        pending.extend_from_slice(&chunk);
        if let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            break serde_json::from_slice::<Value>(&pending[..nl])?;
        }
    };
    assert_eq!(line["deviceId"], "streamer");
    assert_eq!(line["body"], "{\"t\":21}");
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_overview_counts_devices_and_telemetry() -> TestResult {
    let hub = TestHub::start().await?;
    let owner = owner_session(&hub).await?;
    let overview = |b: &Browser| {
        let hub = &hub;
        let cookie = b.cookie.clone();
        async move {
            let a = client(hub)?
                .get(format!("{}/explorer/api/overview", base(hub)))
                .header(header::COOKIE, cookie)
                .send()
                .await?;
            if a.status() != StatusCode::OK {
                return Err(format!("overview answered {}", a.status()).into());
            }
            Ok::<Value, Box<dyn std::error::Error + Send + Sync>>(a.json().await?)
        }
    };
    let before = overview(&owner).await?;
    assert_eq!(before["devices"]["total"], 0);
    assert!(before["version"].is_string());
    assert!(before["retention"]["partitions"].as_u64().unwrap_or(0) > 0);
    assert!(before["storage"]["dataDirBytes"].as_u64().unwrap_or(0) > 0);
    let (key, _) = hub.create_device("ov1").await?;
    let (mut device, _) = hub.connect_device("ov1", &key, true).await?;
    device
        .publish_qos1(1, "devices/ov1/messages/events/", b"0123456789")
        .await?;
    let after = overview(&owner).await?;
    assert_eq!(after["devices"]["total"], 1);
    assert_eq!(after["devices"]["enabled"], 1);
    assert_eq!(after["devices"]["connected"], 1);
    let n = |v: &Value, a: &str, b: &str| v[a][b].as_u64().unwrap_or(0);
    // Process-wide counters: other tests' hubs in this binary may add to them too.
    assert!(n(&after, "telemetry", "messagesIn") > n(&before, "telemetry", "messagesIn"));
    assert!(n(&after, "telemetry", "bytesIn") >= n(&before, "telemetry", "bytesIn") + 10);
    assert!(n(&after, "connects", "accepted") > n(&before, "connects", "accepted"));
    assert!(n(&after, "connections", "current") >= 1);
    assert!(after["eventsOut"].is_u64());
    assert_eq!(
        after["connections"]["byTransport"]["mqtt-tls"]
            .as_u64()
            .map(|n| n >= 1),
        Some(true)
    );

    let anonymous = call(
        &hub,
        Method::GET,
        "/explorer/api/overview",
        None,
        None,
        &[],
        None,
    )
    .await?;
    assert_eq!(anonymous.status, 401);
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn login_tokens_need_a_registry_write_policy_and_the_cli_prints_one() -> TestResult {
    let hub = TestHub::start().await?;
    let anonymous = call(
        &hub,
        Method::POST,
        "/explorer/api/login-tokens?api-version=2021-04-12",
        None,
        None,
        &[],
        None,
    )
    .await?;
    assert_eq!(anonymous.status, 401);
    let read = hub
        .server()
        .hub
        .policy("registryRead")
        .await?
        .ok_or("registryRead")?;
    let read_token = token_for(HOST, &read.primary_key, 600, Some("registryRead"));
    let a = call(
        &hub,
        Method::POST,
        "/explorer/api/login-tokens?api-version=2021-04-12",
        None,
        None,
        &[("Authorization", &read_token)],
        None,
    )
    .await?;
    assert_eq!(a.status, 401, "registry read is not enough");
    let minted = call(
        &hub,
        Method::POST,
        "/explorer/api/login-tokens?api-version=2021-04-12",
        None,
        None,
        &[("Authorization", &owner_token(&hub)?)],
        None,
    )
    .await?;
    assert_eq!(minted.status, 200, "{:?}", minted.body);
    let token = minted.body["token"].as_str().ok_or("token")?;
    assert_eq!(
        minted.body["url"],
        format!("{}/explorer/#token={token}", base(&hub)).as_str()
    );
    sign_in(&hub, &json!({ "token": token })).await?;

    // On a blocking thread: the hub answering the command runs on this test's runtime.
    let dir = hub.dir.path().to_path_buf();
    let (ok, stdout, stderr) =
        tokio::task::spawn_blocking(move || ferrohub_cli(&dir, &["explorer"])).await??;
    assert!(ok, "{stderr}");
    let url = stdout.trim();
    let (_, token) = url.split_once("#token=").ok_or("no token in the URL")?;
    assert!(
        url.starts_with(&format!("{}/explorer/", base(&hub))),
        "{url}"
    );
    sign_in(&hub, &json!({ "token": token })).await?;
    let (again, _, _) = post_session(&hub, &json!({ "token": token })).await?;
    assert_eq!(again, StatusCode::UNAUTHORIZED);
    hub.stop().await;
    Ok(())
}
