// Node client of the real-client corpus (tests/tests/corpus.rs):
// `node http_new_conn.js HOST PORT MAX SECS`.
//
// Node's built-in http module with an agent that does not keep connections
// alive (Node >= 19 keeps them alive by default), resending the same GET as
// soon as the 503 arrives: one new TCP connection per attempt, each of which
// succeeds and fails only in its reply. Bounded by a count and a deadline;
// prints {"ops","ok","fail","secs"} as one JSON line.
'use strict';
const http = require('http');

const [host, port, max, secs] = process.argv.slice(2);
const agent = new http.Agent({ keepAlive: false });
const t0 = process.hrtime.bigint();
const end = Date.now() + Number(secs) * 1000;
let ops = 0;
let ok = 0;

function done() {
  const elapsed = Number(process.hrtime.bigint() - t0) / 1e9;
  console.log(JSON.stringify({ ops, ok, fail: ops - ok, secs: elapsed }));
}

function attempt() {
  if (ops >= Number(max) || Date.now() >= end) {
    done();
    return;
  }
  ops++;
  const req = http.get({ host, port: Number(port), path: '/', agent, timeout: 2000 }, (res) => {
    if (res.statusCode < 400) ok++;
    res.resume();
    res.on('end', attempt);
  });
  req.on('timeout', () => req.destroy(new Error('timeout')));
  req.on('error', attempt);
}

attempt();
