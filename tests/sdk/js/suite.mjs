// The official E2B JS SDK (e2b@2.51.0) in debug mode against a real envd.
// Usage: node suite.mjs URL WORKDIR. Exits non-zero if any test fails.
import assert from 'node:assert/strict'
import { Sandbox, CommandExitError, FileType, NotFoundError } from 'e2b'

const [url, root] = process.argv.slice(2)
const p = (...parts) => [root, ...parts].join('/')
const sandbox = () => Sandbox.create({ debug: true, sandboxUrl: url })

const tests = {
  async filesWriteReadList() {
    const sbx = await sandbox()
    assert.equal(await sbx.files.makeDir(p('js', 'dir')), true)
    const info = await sbx.files.write(p('js', 'a.txt'), 'hello js')
    assert.equal(info.path, p('js', 'a.txt'))
    await sbx.files.write(p('js', 'dir', 'b.bin'), new Uint8Array([0, 1, 2]).buffer)
    assert.equal(await sbx.files.read(p('js', 'a.txt')), 'hello js')
    const bytes = await sbx.files.read(p('js', 'dir', 'b.bin'), { format: 'bytes' })
    assert.deepEqual(Array.from(bytes), [0, 1, 2])
    const names = (await sbx.files.list(p('js'))).map((e) => e.name).sort()
    assert.deepEqual(names, ['a.txt', 'dir'])
    const entry = (await sbx.files.list(p('js'))).find((e) => e.name === 'dir')
    assert.equal(entry.type, FileType.DIR)
    assert.equal(await sbx.files.exists(p('js', 'nope')), false)
    await sbx.files.rename(p('js', 'a.txt'), p('js', 'c.txt'))
    await sbx.files.remove(p('js', 'dir'))
    assert.equal(await sbx.files.exists(p('js', 'dir')), false)
    await assert.rejects(sbx.files.read(p('js', 'missing')), NotFoundError)
  },

  async watchDir() {
    const sbx = await sandbox()
    await sbx.files.makeDir(p('jsw'))
    const seen = []
    const handle = await sbx.files.watchDir(p('jsw'), (e) => seen.push(e), { timeoutMs: 30000 })
    await sbx.files.write(p('jsw', 'x.txt'), 'x')
    for (let i = 0; i < 50 && !seen.some((e) => e.name === 'x.txt'); i++) await new Promise((r) => setTimeout(r, 100))
    await handle.stop()
    assert.ok(seen.some((e) => e.name === 'x.txt'), JSON.stringify(seen))
  },

  async commandsRun() {
    const sbx = await sandbox()
    const out = []
    const r = await sbx.commands.run('echo $FOO; pwd', { envs: { FOO: 'bar' }, cwd: '/tmp', onStdout: (d) => out.push(d) })
    assert.equal(r.exitCode, 0)
    assert.equal(r.stdout, 'bar\n/tmp\n')
    assert.equal(out.join(''), r.stdout)
    await assert.rejects(sbx.commands.run('echo e >&2; exit 3'), (e) => e instanceof CommandExitError && e.exitCode === 3 && e.stderr === 'e\n')
  },

  async commandsBackgroundKill() {
    const sbx = await sandbox()
    // Killed only once the login shell's profile is done: a kill inside it can
    // leave a lock of the machine's own (pyenv's rehash lock in root's .bashrc)
    // that holds every later login shell for 60 s.
    const h = await sbx.commands.run(`mkdir -p ${root} && touch ${p('sleeping')}; sleep 60`, { background: true })
    for (let i = 0; i < 1500 && !(await sbx.files.exists(p('sleeping'))); i++) await new Promise((r) => setTimeout(r, 20))
    assert.ok(await sbx.files.exists(p('sleeping')))
    assert.ok((await sbx.commands.list()).some((x) => x.pid === h.pid))
    assert.equal(await sbx.commands.kill(h.pid), true)
    await assert.rejects(h.wait(), CommandExitError)
    assert.equal(await sbx.commands.kill(h.pid), false)
  },
}

let failed = 0
for (const [name, fn] of Object.entries(tests)) {
  const t = Date.now()
  try {
    await fn()
    console.log(`PASS ${name} (${((Date.now() - t) / 1000).toFixed(2)}s)`)
  } catch (e) {
    failed++
    console.log(`FAIL ${name}`)
    console.log(e)
  }
}
console.log(`${Object.keys(tests).length - failed} passed, ${failed} failed`)
process.exit(failed ? 1 : 0)
