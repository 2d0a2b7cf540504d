// The Node Event Hubs client (@azure/event-hubs) reading Ferrohub's Event Hubs-compatible
// endpoint, driven by interop/tests/test_node_clients.py. Reads every partition from the
// earliest event until COUNT events of DEVICE_ID arrived, then prints one JSON object:
// {"partitionIds": [...], "properties": {...}, "events": [...]}.
// Environment: EVENTHUB_CS (the Event Hubs-compatible connection string), DEVICE_ID, COUNT,
// and NODE_EXTRA_CA_CERTS (the hub's CA) set by the caller.
'use strict';

const { EventHubConsumerClient, earliestEventPosition } = require('@azure/event-hubs');

const TIMEOUT_MS = 30000;

async function main() {
  const deviceId = process.env.DEVICE_ID;
  const want = Number(process.env.COUNT);
  const client = new EventHubConsumerClient('$Default', process.env.EVENTHUB_CS);
  const timer = setTimeout(() => {
    process.stdout.write(JSON.stringify({ error: `fewer than ${want} events in ${TIMEOUT_MS} ms` }) + '\n');
    process.exit(1);
  }, TIMEOUT_MS);
  const partitionIds = await client.getPartitionIds();
  const properties = await client.getEventHubProperties();
  const events = [];
  const finished = new Promise((resolve, reject) => {
    const subscription = client.subscribe(
      {
        processEvents: async (batch, context) => {
          for (const e of batch) {
            if (e.systemProperties['iothub-connection-device-id'] !== deviceId) continue;
            events.push({
              partitionId: context.partitionId,
              body: Buffer.isBuffer(e.body) ? e.body.toString() : e.body,
              contentType: e.contentType,
              messageId: e.messageId,
              properties: e.properties,
              offset: String(e.offset),
              sequenceNumber: e.sequenceNumber,
              enqueuedTimeUtc: e.enqueuedTimeUtc.toISOString(),
              systemProperties: e.systemProperties,
            });
          }
          if (events.length >= want) {
            await subscription.close();
            resolve();
          }
        },
        processError: async (err) => reject(err),
      },
      { startPosition: earliestEventPosition, maxWaitTimeInSeconds: 1 },
    );
  });
  await finished;
  clearTimeout(timer);
  process.stdout.write(JSON.stringify({ partitionIds, properties, events }) + '\n');
  await client.close();
}

main().then(() => process.exit(0), (err) => {
  process.stdout.write(JSON.stringify({ error: 'unexpected error', name: err.name, message: err.message }) + '\n');
  process.exit(1);
});
