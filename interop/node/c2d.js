// The Node service SDK (azure-iothub, AMQP on rhea) against Ferrohub, driven by
// interop/tests/test_node_clients.py. Prints one JSON object per line on stdout.
//   node c2d.js send-with-feedback   send MESSAGE_ID to DEVICE_ID with ack 'full', print
//                                    {"sent": ...}, then the feedback record for it as
//                                    Client.getFeedbackReceiver delivers it ({"feedback": ...})
//   node c2d.js send-unknown         send to DEVICE_ID (not registered): print the error's name
// Environment: SERVICE_CS (a service connection string), DEVICE_ID, MESSAGE_ID, TRANSPORT
// (`amqp`, the default: AMQP over TLS on 5671; `amqp-ws`: AMQP over WebSocket on 443), and
// NODE_EXTRA_CA_CERTS (the hub's CA) set by the caller.
'use strict';

const { Client, AmqpWs } = require('azure-iothub');
const { Message } = require('azure-iothub/dist/common-core/message');

const TIMEOUT_MS = 30000;

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function fail(what, err) {
  out({ error: what, name: err && err.name, message: err && err.message });
  process.exit(1);
}

async function main() {
  const mode = process.argv[2];
  const deviceId = process.env.DEVICE_ID;
  const client = process.env.TRANSPORT === 'amqp-ws'
    ? Client.fromConnectionString(process.env.SERVICE_CS, AmqpWs)
    : Client.fromConnectionString(process.env.SERVICE_CS);
  setTimeout(() => fail(`${mode} did not finish in ${TIMEOUT_MS} ms`), TIMEOUT_MS).unref();
  await client.open();

  if (mode === 'send-unknown') {
    try {
      await client.send(deviceId, new Message('nobody listens'));
      out({ sent: true });
    } catch (err) {
      out({ refused: err.name, message: err.message });
    }
    await client.close();
    return;
  }

  if (mode !== 'send-with-feedback') {
    throw new Error(`unknown mode ${mode}`);
  }
  const messageId = process.env.MESSAGE_ID;
  // The callback form, as the SDK's samples use it (the promise form wraps the receiver).
  const receiver = await new Promise((resolve, reject) => {
    client.getFeedbackReceiver((err, r) => (err ? reject(err) : resolve(r)));
  });
  const done = new Promise((resolve, reject) => {
    receiver.on('errorReceived', reject);
    receiver.on('message', (msg) => {
      const records = JSON.parse(msg.data.toString());
      const mine = records.find((r) => r.originalMessageId === messageId);
      receiver.complete(msg, (err) => {
        if (err) {
          reject(err);
        } else if (mine) {
          resolve({ feedback: mine, contentType: msg.contentType, batch: records.length });
        }
      });
    });
  });
  const m = new Message(JSON.stringify({ from: 'node' }));
  m.messageId = messageId;
  m.ack = 'full';
  m.contentType = 'application/json';
  m.contentEncoding = 'utf-8';
  m.properties.add('sdk', 'node');
  const result = await client.send(deviceId, m);
  out({ sent: result ? result.constructor.name : true });
  out(await done);
  await client.close();
}

main().then(() => process.exit(0), (err) => fail('unexpected error', err));
