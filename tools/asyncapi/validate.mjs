// Validates AsyncAPI documents with the official AsyncAPI parser
// (@asyncapi/parser, pinned in package-lock.json): every file named on the
// command line, or one document on standard input when none is. Prints each
// diagnostic; exits 1 when any document has an error, or a warning (a
// document Tandem publishes should not leave one), 0 when all are clean.
import { readFileSync } from 'node:fs';
import { Parser, DiagnosticSeverity } from '@asyncapi/parser';

const parser = new Parser();
const sources = process.argv.length > 2
  ? process.argv.slice(2).map((path) => [path, readFileSync(path, 'utf8')])
  : [['<stdin>', readFileSync(0, 'utf8')]];

let failed = false;
for (const [name, text] of sources) {
  const { document, diagnostics } = await parser.parse(text);
  const problems = diagnostics.filter((d) => d.severity <= DiagnosticSeverity.Warning);
  for (const d of problems) {
    const level = d.severity === DiagnosticSeverity.Error ? 'error' : 'warning';
    console.error(`${name}: ${level} ${d.code} at /${d.path.join('/')}: ${d.message}`);
  }
  if (!document || problems.length > 0) {
    failed = true;
    if (!document) console.error(`${name}: not a valid AsyncAPI document`);
  } else {
    console.log(`${name}: valid AsyncAPI ${document.version()}, ${document.channels().length} channels, ${document.operations().length} operations, ${document.messages().length} messages`);
  }
}
process.exit(failed ? 1 : 0);
