// The Node service SDK's query (azure-iothub Registry.createQuery over HTTPS) against Ferrohub,
// driven by interop/tests/test_query.py. Prints one JSON line on stdout:
//   node query.js pages   run QUERY with PAGE_SIZE per page through Query.nextAsTwin while
//                         hasMoreResults, print {"pages": [[deviceId, ...], ...]}
// Environment: SERVICE_CS (a connection string with registry read), QUERY, PAGE_SIZE and
// NODE_EXTRA_CA_CERTS (the hub's CA) set by the caller.
'use strict';

const { Registry } = require('azure-iothub');

const TIMEOUT_MS = 30000;

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

async function main() {
  const mode = process.argv[2];
  if (mode !== 'pages') {
    throw new Error(`unknown mode ${mode}`);
  }
  setTimeout(() => {
    out({ error: `${mode} did not finish in ${TIMEOUT_MS} ms` });
    process.exit(1);
  }, TIMEOUT_MS).unref();
  const registry = Registry.fromConnectionString(process.env.SERVICE_CS);
  const query = registry.createQuery(process.env.QUERY, Number(process.env.PAGE_SIZE));
  const pages = [];
  // The SDK loops while the last answer carried x-ms-continuation; a page loop that never
  // ends would show here as the timeout above.
  while (query.hasMoreResults) {
    const { result } = await query.nextAsTwin();
    pages.push(result.map((twin) => twin.deviceId));
  }
  out({ pages });
}

main().catch((err) => {
  out({ error: 'query failed', name: err && err.name, message: err && err.message });
  process.exit(1);
});
