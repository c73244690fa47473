// The same variants as picstream's profile, made by sharp: a reference for bench/convert.py.
//
//   node bench/sharp/convert.js FILE RUNS sequential|parallel SPECS_JSON
//
// SPECS_JSON: [{"name", "format", "width", "quality", "effort"}...] plus the JPEG background,
// as {"specs": [...], "background": "#ffffff", "animated": false, "raw": null}. "sequential"
// makes one variant after the other; "parallel" starts them all at once (libuv's pool, like a
// typical sharp service). "animated": WebP variants keep every frame, the others show the
// first, as picstream's. "raw": {"path", "width", "height"} of RGB pixels to start from
// instead of FILE (sharp's prebuilt libvips cannot decode HEIC).
// Prints one JSON line: per-run milliseconds (wall and CPU), output bytes, peak RSS.
'use strict';

const fs = require('node:fs/promises');
const sharp = require('sharp');

sharp.cache(false); // every run decodes again, like a fresh job

function input(file, spec, plan) {
  if (plan.raw) {
    const { width, height } = plan.raw;
    return sharp(plan.rawPixels, { raw: { width, height, channels: 3 } });
  }
  return sharp(file, { animated: Boolean(plan.animated) && spec.format === 'webp' });
}

function pipeline(file, spec, plan) {
  const background = plan.background;
  let p = input(file, spec, plan)
    .rotate()
    .resize({ width: spec.width, withoutEnlargement: true });
  switch (spec.format) {
    case 'avif':
      // libvips' heifsave subsamples chroma below Q90; sharp's default is 4:4:4.
      return p.avif({ quality: spec.quality, effort: spec.effort, chromaSubsampling: '4:2:0' });
    case 'webp':
      return p.webp({ quality: spec.quality, effort: spec.effort });
    case 'jpeg':
      return p
        .flatten({ background })
        .jpeg({ quality: spec.quality, progressive: true, optimiseCoding: true });
    case 'png':
      return p.png({ compressionLevel: spec.effort });
    default:
      throw new Error(`unknown format ${spec.format}`);
  }
}

async function convert(file, plan, mode) {
  // Raw pixels are read from disk each run, as FILE is.
  if (plan.raw) plan.rawPixels = await fs.readFile(plan.raw.path);
  const make = (spec) => pipeline(file, spec, plan).toBuffer();
  if (mode === 'parallel') return Promise.all(plan.specs.map(make));
  const out = [];
  for (const spec of plan.specs) out.push(await make(spec));
  return out;
}

async function main() {
  const [file, runs, mode, specs] = process.argv.slice(2);
  const plan = JSON.parse(specs);
  // Warm-up; with RUNS=0 the only conversion (then the peak RSS is one image's).
  let bytes = (await convert(file, plan, mode)).reduce((sum, b) => sum + b.length, 0);
  const times = [];
  const cpu = [];
  for (let i = 0; i < Number(runs); i++) {
    const start = process.hrtime.bigint();
    const startCpu = process.cpuUsage();
    const out = await convert(file, plan, mode);
    times.push(Number(process.hrtime.bigint() - start) / 1e6);
    const used = process.cpuUsage(startCpu); // every thread: libuv's pool and libvips'
    cpu.push((used.user + used.system) / 1000);
    bytes = out.reduce((sum, b) => sum + b.length, 0);
  }
  const rss = process.resourceUsage().maxRSS; // KiB
  console.log(JSON.stringify({ times, cpu, bytes, maxrss_kib: rss, sharp: sharp.versions.sharp }));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
