#!/usr/bin/env node
// node-postgres through pgsluice: run by tests/test_compat_node.py as
//   node tests/node/pg_client.js <postgresql://user:pw@host:port/db> [table-prefix]
// Prints one JSON object on stdout: {"ok": true, "checks": {...}} or {"ok": false, "error": ...};
// exits 0 only if every check passed.
'use strict';

const assert = require('node:assert/strict');
const { Client, Pool } = require('pg');

const dsn = process.argv[2];
const prefix = process.argv[3] || 'node';
const table = `${prefix}_items`;
const POOL_CLIENTS = 20;
const TASKS = 200;
// fail instead of hanging if the proxy stops answering
const LIMITS = { connectionTimeoutMillis: 15000, query_timeout: 20000 };

const checks = {};

async function single(client) {
  // parameterized queries, {text, values} form
  let res = await client.query({ text: 'SELECT $1::int + $2::int AS sum, $3::text AS label', values: [2, 40, 'x'] });
  assert.deepEqual(res.rows, [{ sum: 42, label: 'x' }]);
  res = await client.query('SELECT g, $1::text || g AS s FROM generate_series(1, $2::int) AS g', ['n', 4]);
  assert.deepEqual(res.rows.map((r) => r.s), ['n1', 'n2', 'n3', 'n4']);
  res = await client.query({ text: 'SELECT $1::jsonb AS j, $2::int[] AS a, $3::text IS NULL AS isnull',
    values: [{ k: 'v', n: [1, 2] }, [1, 2, 3], null] });
  assert.deepEqual(res.rows[0], { j: { k: 'v', n: [1, 2] }, a: [1, 2, 3], isnull: true });
  checks.parameterized = true;

  // named prepared statements: parsed once per connection, then only Bind/Execute by name
  for (let k = 0; k < 5; k++) {
    res = await client.query({ name: 'times_ten', text: 'SELECT $1::int * 10 AS p', values: [k] });
    assert.equal(res.rows[0].p, k * 10);
    res = await client.query({ name: 'echo_text', text: 'SELECT $1::text AS t, $2::int AS n', values: [`v${k}`, k] });
    assert.deepEqual(res.rows, [{ t: `v${k}`, n: k }]);
  }
  // a named statement that fails to parse leaves the connection and other statements usable
  await assert.rejects(client.query({ name: 'broken', text: 'SELEC $1::int', values: [1] }),
    (err) => err.code === '42601');
  res = await client.query({ name: 'times_ten', text: 'SELECT $1::int * 10 AS p', values: [9] });
  assert.equal(res.rows[0].p, 90);
  checks.named_prepared = true;

  await client.query(`DROP TABLE IF EXISTS ${table}`);
  await client.query(`CREATE TABLE ${table} (id int PRIMARY KEY, who text NOT NULL, n int NOT NULL)`);

  // a committed transaction, and one rolled back after an error
  await client.query('BEGIN');
  await client.query({ name: 'ins', text: `INSERT INTO ${table} VALUES ($1, $2, $3)`, values: [1, 'txn', 1] });
  await client.query({ name: 'ins', text: `INSERT INTO ${table} VALUES ($1, $2, $3)`, values: [2, 'txn', 2] });
  res = await client.query(`SELECT count(*)::int AS c FROM ${table}`);
  assert.equal(res.rows[0].c, 2);
  await client.query('COMMIT');
  await client.query('BEGIN');
  await client.query({ name: 'ins', text: `INSERT INTO ${table} VALUES ($1, $2, $3)`, values: [3, 'txn', 3] });
  await assert.rejects(
    client.query({ name: 'ins', text: `INSERT INTO ${table} VALUES ($1, $2, $3)`, values: [1, 'dup', 0] }),
    (err) => err.code === '23505');
  await assert.rejects(client.query('SELECT 1'), (err) => err.code === '25P02');
  await client.query('ROLLBACK');
  res = await client.query(`SELECT id FROM ${table} ORDER BY id`);
  assert.deepEqual(res.rows.map((r) => r.id), [1, 2]);
  // the named statement still works after the failed transaction
  res = await client.query({ name: 'times_ten', text: 'SELECT $1::int * 10 AS p', values: [7] });
  assert.equal(res.rows[0].p, 70);
  // an error in a parameterized query outside a transaction leaves the connection usable
  await assert.rejects(client.query('SELECT 1 / $1::int', [0]), (err) => err.code === '22012');
  res = await client.query('SELECT 1 / $1::int AS q', [1]);
  assert.equal(res.rows[0].q, 1);
  checks.transaction = true;
}

// Each pooled connection prepares a statement whose text is its own, then all 20 run theirs
// concurrently: over 3 server connections, most executions land where it was never parsed.
async function ownStatements(pool) {
  const clients = await Promise.all([...Array(POOL_CLIENTS).keys()].map(() => pool.connect()));
  try {
    await Promise.all(clients.map(async (client, c) => {
      for (let k = 0; k < 10; k++) {
        const r = await client.query({ name: 'mine', text: `SELECT $1::int + ${c * 1000} AS v /* conn ${c} */`,
          values: [k] });
        assert.equal(r.rows[0].v, c * 1000 + k);
      }
    }));
  } finally {
    clients.forEach((client) => client.release());
  }
  checks.own_statements = clients.length;
}

async function pooled(pool) {
  const tasks = [];
  for (let i = 0; i < TASKS; i++) {
    if (i % 4 === 0) {
      tasks.push((async () => {
        const client = await pool.connect();
        try {
          await client.query('BEGIN');
          await client.query({ name: 'pool_ins', text: `INSERT INTO ${table} VALUES ($1, $2, $3)`,
            values: [1000 + i, 'pool', i] });
          const r = await client.query({ name: 'pool_get', text: `SELECT n FROM ${table} WHERE id = $1`,
            values: [1000 + i] });
          assert.deepEqual(r.rows, [{ n: i }]);
          await client.query('COMMIT');
        } finally {
          client.release();
        }
      })());
    } else if (i % 4 === 1) {
      tasks.push(pool.query({ name: 'pool_mul', text: 'SELECT $1::int * $2::int AS m', values: [i, 3] })
        .then((r) => assert.equal(r.rows[0].m, i * 3)));
    } else if (i % 4 === 2) {
      tasks.push(pool.query('SELECT $1::text AS t, pg_sleep(0.001) IS NULL AS slept', [`task${i}`])
        .then((r) => assert.deepEqual(r.rows, [{ t: `task${i}`, slept: false }])));
    } else {
      tasks.push(pool.query({ name: 'pool_series', text: 'SELECT sum(g)::int AS s FROM generate_series(1, $1::int) g',
        values: [i] }).then((r) => assert.equal(r.rows[0].s, (i * (i + 1)) / 2)));
    }
  }
  await Promise.all(tasks);
  assert.equal(pool.totalCount, POOL_CLIENTS);
  const res = await pool.query(`SELECT count(*)::int AS c, sum(n)::int AS s FROM ${table} WHERE who = 'pool'`);
  const inserted = [...Array(TASKS).keys()].filter((i) => i % 4 === 0);
  assert.deepEqual(res.rows[0], { c: inserted.length, s: inserted.reduce((a, b) => a + b, 0) });
  checks.pool = { clients: pool.totalCount, tasks: TASKS, inserted: inserted.length };
}

async function main() {
  const client = new Client({ connectionString: dsn, ...LIMITS });
  await client.connect();
  try {
    await single(client);
  } finally {
    await client.end();
  }
  const pool = new Pool({ connectionString: dsn, max: POOL_CLIENTS, ...LIMITS });
  try {
    // open all 20 connections up front so they really share the proxy's few server connections
    const held = await Promise.all([...Array(POOL_CLIENTS).keys()].map(() => pool.connect()));
    held.forEach((c) => c.release());
    await ownStatements(pool);
    await pooled(pool);
    await pool.query(`DROP TABLE ${table}`);
  } finally {
    await pool.end();
  }
}

main().then(
  () => {
    process.stdout.write(JSON.stringify({ ok: true, checks }) + '\n');
  },
  (err) => {
    process.stdout.write(JSON.stringify({
      ok: false, checks, error: String(err && err.stack ? err.stack : err), code: err && err.code,
    }) + '\n');
    process.exitCode = 1;
  },
);
