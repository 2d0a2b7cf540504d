// The Node service SDK's JobClient (azure-iothub, HTTPS) against Ferrohub, driven by
// interop/tests/test_jobs.py. Prints one JSON line on stdout:
//   node jobs.js twin   JobClient.scheduleTwinUpdate(JOB_ID, QUERY, {tags: {node: JOB_ID}})
//                       now, getJob until it ends, then createQuery over every completed
//                       twin job page by page; prints {"created", "final", "listed"}
// Environment: SERVICE_CS (registry write), JOB_ID, QUERY and NODE_EXTRA_CA_CERTS (the hub's
// CA) set by the caller.
'use strict';

const { JobClient } = require('azure-iothub');

const TIMEOUT_MS = 30000;

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

async function main() {
  const mode = process.argv[2];
  if (mode !== 'twin') {
    throw new Error(`unknown mode ${mode}`);
  }
  setTimeout(() => {
    out({ error: `${mode} did not finish in ${TIMEOUT_MS} ms` });
    process.exit(1);
  }, TIMEOUT_MS).unref();
  const jobs = JobClient.fromConnectionString(process.env.SERVICE_CS);
  const jobId = process.env.JOB_ID;
  const patch = { etag: '*', tags: { node: jobId } };
  const { jobStatus: created } = await jobs.scheduleTwinUpdate(
    jobId, process.env.QUERY, patch, new Date(), 60);
  let final;
  for (;;) {
    ({ jobStatus: final } = await jobs.getJob(jobId));
    if (['completed', 'failed', 'cancelled'].includes(final.status)) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  const query = jobs.createQuery('scheduleUpdateTwin', 'completed', 2);
  const listed = [];
  while (query.hasMoreResults) {
    const { result } = await query.next();
    listed.push(...result.map((j) => j.jobId));
  }
  out({ created, final, listed });
}

main().catch((err) => {
  out({ error: 'jobs failed', name: err && err.name, message: err && err.message });
  process.exit(1);
});
