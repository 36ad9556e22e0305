// .dockerignore matching as Docker does it (moby/patternmatcher): patterns are cleaned paths
// relative to the context root; `*` matches within one path element, `?` one character, `**` any
// number of elements (none included); a pattern that matches a parent folder matches everything
// below it; `!` re-includes; the last matching pattern wins.

function toRegExp(pattern) {
  let re = "";
  for (let i = 0; i < pattern.length; i++) {
    const ch = pattern[i];
    if (ch === "*") {
      if (pattern[i + 1] === "*") {
        i++;
        if (pattern[i + 1] === "/") {  // "**/": zero or more folders
          i++;
          re += "(?:.*/)?";
        } else {
          re += ".*";
        }
      } else {
        re += "[^/]*";
      }
    } else if (ch === "?") {
      re += "[^/]";
    } else if (ch === "[") {
      const end = pattern.indexOf("]", i);
      if (end < 0) throw new Error(`bad pattern ${pattern}`);
      re += pattern.slice(i, end + 1).replace(/^\[!/, "[^");
      i = end;
    } else if (ch === "\\") {
      re += `\\${pattern[++i]}`;
    } else {
      re += ch.replace(/[.+^${}()|\]\\]/g, "\\$&");
    }
  }
  return new RegExp(`^${re}$`);
}

function clean(p) {
  const parts = [];
  for (const seg of p.replace(/^\/+/, "").split("/")) {
    if (seg === "" || seg === ".") continue;
    if (seg === "..") parts.pop();
    else parts.push(seg);
  }
  return parts.join("/") || ".";
}

// Parses .dockerignore text into [{negate, re, text}].
export function parseDockerignore(text) {
  const out = [];
  for (let line of text.split("\n")) {
    line = line.trim();
    if (line === "" || line.startsWith("#")) continue;
    const negate = line.startsWith("!");
    if (negate) line = line.slice(1).trim();
    const pattern = clean(line);
    out.push({ negate, re: toRegExp(pattern), text: pattern });
  }
  return out;
}

// True if `file` (relative to the context root, "/"-separated) is left out of the context.
export function isExcluded(patterns, file) {
  const f = clean(file);
  const parents = [];
  const parts = f.split("/");
  for (let i = 1; i < parts.length; i++) parents.push(parts.slice(0, i).join("/"));
  let excluded = false;
  for (const p of patterns) {
    let match = p.re.test(f);
    if (!match) match = parents.some((d) => p.re.test(d));
    if (match) excluded = !p.negate;
  }
  return excluded;
}
