// The Node service SDK's digital twin client (azure-iothub DigitalTwinClient, REST over HTTPS)
// against Ferrohub, driven by interop/tests/test_digital_twin.py. Prints one JSON object per
// line on stdout: the digital twin with its ETag, the update's answer (with that ETag as
// If-Match), then a root and a component command's result with the device's status.
// Environment: OWNER_CS (the owner connection string), DEVICE_ID, PATCH (a JSON Patch array),
// and NODE_EXTRA_CA_CERTS (the hub's CA) set by the caller.
'use strict';

const { DigitalTwinClient, IoTHubTokenCredentials } = require('azure-iothub');

const TIMEOUT_MS = 30000;

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function fail(what, err) {
  out({
    error: what,
    name: err && err.name,
    message: err && err.message,
    status: err && (err.statusCode || (err.response && err.response.status)),
  });
  process.exit(1);
}

async function main() {
  const id = process.env.DEVICE_ID;
  const client = new DigitalTwinClient(new IoTHubTokenCredentials(process.env.OWNER_CS));
  setTimeout(() => fail(`digital_twin.js did not finish in ${TIMEOUT_MS} ms`), TIMEOUT_MS).unref();

  const got = await client.getDigitalTwin(id);
  const { _response: getResponse, ...twin } = got;
  const etag = getResponse.headers.get('etag');
  out({ twin, etag });

  // No body on 202: the HTTP response comes only to a callback.
  const updated = await new Promise((resolve, reject) => {
    client.updateDigitalTwin(id, JSON.parse(process.env.PATCH), etag, (err, _result, response) =>
      (err ? reject(err) : resolve(response)));
  });
  out({ status: updated.status, etag: updated.headers.get('etag') });

  const root = await client.invokeCommand(id, 'reboot', { delay: 1 }, { responseTimeoutInSeconds: 10 });
  out({ body: root.body, statusCode: root.xMsCommandStatuscode, requestId: root.xMsRequestId });
  const comp = await client.invokeComponentCommand(id, 'thermostat1', 'getMaxMinReport',
    '2026-12-01T00:00:00Z', { connectTimeoutInSeconds: 5, responseTimeoutInSeconds: 10 });
  out({ body: comp.body, statusCode: comp.xMsCommandStatuscode, requestId: comp.xMsRequestId });
}

main().catch((err) => fail('digital twin calls', err));
