// SQLite compiled to WebAssembly (sql.js): an in-memory database of MIB one-MiB random blobs,
// its WebAssembly.Memory growing with it; prints "sqlite rows N bytes B".
//   node sqljs.js MIB
const initSqlJs = require("sql.js");

async function main() {
  const mib = Number(process.argv[2] || 64);
  const SQL = await initSqlJs();
  const db = new SQL.Database();
  db.run("CREATE TABLE t (id INTEGER PRIMARY KEY, data BLOB)");
  db.run("BEGIN");
  const insert = db.prepare("INSERT INTO t (data) VALUES (randomblob(?))");
  for (let i = 0; i < mib; i++) insert.run([1 << 20]);
  insert.free();
  db.run("COMMIT");
  const [count, bytes] = db.exec("SELECT count(*), sum(length(data)) FROM t")[0].values[0];
  console.log(`sqlite rows ${count} bytes ${bytes}`);
}

main().catch((err) => {
  console.error(String(err && err.stack ? err.stack : err));
  process.exit(1);
});
