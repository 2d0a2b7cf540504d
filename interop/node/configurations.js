// The Node service SDK's configuration methods (azure-iothub Registry.addConfiguration,
// getConfiguration, getConfigurations, updateConfiguration, removeConfiguration) against
// Ferrohub, driven by interop/tests/test_configurations.py. Prints one JSON object on stdout.
// Environment: OWNER_CS (the owner connection string), CONFIG_ID, TARGET (a target condition)
// and NODE_EXTRA_CA_CERTS (the hub's CA) set by the caller.
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
  const registry = Registry.fromConnectionString(process.env.OWNER_CS);
  setTimeout(() => fail(`configurations did not finish in ${TIMEOUT_MS} ms`), TIMEOUT_MS).unref();
  const id = process.env.CONFIG_ID;
  await registry.addConfiguration({
    id,
    content: { deviceContent: { 'properties.desired.nodeSetting': { level: 3 } } },
    targetCondition: process.env.TARGET,
    priority: 4,
    labels: { by: 'node' },
  });
  const got = (await registry.getConfiguration(id)).responseBody;
  const listed = (await registry.getConfigurations()).responseBody.map((c) => c.id);
  got.priority = 5;
  // forceUpdate: If-Match "*".
  const updated = (await registry.updateConfiguration(got, true)).responseBody;
  await registry.removeConfiguration(id);
  let afterRemove = null;
  try {
    await registry.getConfiguration(id);
  } catch (err) {
    afterRemove = err.response && err.response.statusCode;
  }
  out({ got, listed, updated, afterRemove });
}

main().catch((err) => fail('configurations', err));
