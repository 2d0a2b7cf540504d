// The Node service SDK's registry (azure-iothub Registry, REST over HTTPS) against Ferrohub,
// driven by interop/tests/test_node_registry.py. Prints one JSON object per line on stdout.
//   node registry.js list          Registry.list (GET /devices/?api-version=...): print the ids
//   node registry.js add-devices   Registry.addDevices with DEVICE_IDS (comma-separated; the
//                                  caller makes one of them exist already): print the result
// Environment: OWNER_CS (the owner connection string), DEVICE_IDS, and NODE_EXTRA_CA_CERTS
// (the hub's CA) set by the caller.
'use strict';

const { Registry } = require('azure-iothub');

const TIMEOUT_MS = 30000;

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function fail(what, err) {
  out({
    error: what,
    name: err && err.name,
    message: err && err.message,
    status: err && err.response && err.response.statusCode,
  });
  process.exit(1);
}

async function main() {
  const mode = process.argv[2];
  const registry = Registry.fromConnectionString(process.env.OWNER_CS);
  setTimeout(() => fail(`${mode} did not finish in ${TIMEOUT_MS} ms`), TIMEOUT_MS).unref();

  if (mode === 'list') {
    const { responseBody, httpResponse } = await registry.list();
    out({
      status: httpResponse.statusCode,
      ids: responseBody.map((d) => d.deviceId),
      // One device as the SDK's Device model holds it, to check the JSON forms.
      sample: responseBody[0] || null,
    });
    return;
  }
  if (mode === 'add-devices') {
    const ids = (process.env.DEVICE_IDS || '').split(',').filter(Boolean);
    const { responseBody, httpResponse } = await registry.addDevices(ids.map((deviceId) => ({ deviceId })));
    out({ status: httpResponse.statusCode, result: responseBody });
    return;
  }
  throw new Error(`unknown mode ${mode}`);
}

main().catch((err) => fail(process.argv[2], err));
