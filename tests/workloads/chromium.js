// Drive Debian's chromium with playwright-core: render a page that makes a WebAssembly.Memory of
// 4 GiB maximum and fills GROW_MIB of it (what a WASM-heavy web app does), or spin forever.
//   node chromium.js wasm GROW_MIB     prints "wasm <bytes> <checksum>" and exits 0
//   node chromium.js spin              prints "spinning" once the page's loop runs, never ends
const { chromium } = require("playwright-core");

const PAGE = `<!doctype html><title>wasm</title><script>
function fill(mib) {
  const memory = new WebAssembly.Memory({ initial: 1, maximum: 65536 }); // 65536 pages = 4 GiB
  memory.grow(Math.ceil((mib * 1048576) / 65536)); // not mib << 20: int32 overflows at 2048
  const bytes = new Uint8Array(memory.buffer);
  let sum = 0;
  for (let i = 0; i < bytes.length; i += 4096) { bytes[i] = (i >> 12) & 0xff; sum += bytes[i]; }
  return [memory.buffer.byteLength, sum];
}
</script><p>ready</p>`;

async function main() {
  const [mode, arg] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    // As root Chromium needs --no-sandbox; /dev/shm may be small in containers.
    args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
    timeout: 120000,
  });
  const page = await browser.newPage();
  await page.setContent(PAGE);
  if (mode === "spin") {
    page.evaluate("for (;;) {}").catch(() => {});
    await new Promise((resolve) => setTimeout(resolve, 500));
    console.log("spinning");
    await new Promise(() => {});
  }
  const [length, sum] = await page.evaluate(`fill(${Number(arg || 256)})`);
  console.log(`wasm ${length} ${sum} ${await page.textContent("p")}`);
  await browser.close();
}

main().catch((err) => {
  console.error(String(err && err.stack ? err.stack : err));
  process.exit(1);
});
