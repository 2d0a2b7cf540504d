// The Node device provisioning SDK (azure-iot-provisioning-device 1.9.1 with its MQTT transport,
// azure-iot-provisioning-device-mqtt 1.8.1, or its HTTP one, azure-iot-provisioning-device-http
// 1.9.1, and azure-iot-security-symmetric-key 1.8.2) against Ferrohub's DPS endpoint, driven by
// interop/tests/test_provisioning.py. Prints one JSON object on stdout: the registration
// result, or {"error": ...}.
//   node provision.js mqtt|http HOST ID_SCOPE REGISTRATION_ID SYMMETRIC_KEY [PAYLOAD_JSON]
// Trust comes from NODE_EXTRA_CA_CERTS (the hub's CA), set by the caller.
'use strict';

const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Mqtt } = require('azure-iot-provisioning-device-mqtt');
const { Http } = require('azure-iot-provisioning-device-http');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');

const TIMEOUT_MS = 30000;

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function fail(what, err) {
  out({
    error: what,
    name: err && err.name,
    message: err && err.message,
    result: err && err.result,
  });
  process.exit(1);
}

const [transport, host, idScope, registrationId, key, payload] = process.argv.slice(2);
setTimeout(() => fail(`register did not finish in ${TIMEOUT_MS} ms`), TIMEOUT_MS).unref();

const security = new SymmetricKeySecurityClient(registrationId, key);
const client = ProvisioningDeviceClient.create(
  host, idScope, transport === 'http' ? new Http() : new Mqtt(), security);
if (payload) {
  client.setProvisioningPayload(JSON.parse(payload));
}
client.register((err, result) => {
  if (err) {
    fail('register', err);
    return;
  }
  out(result);
  process.exit(0);
});
