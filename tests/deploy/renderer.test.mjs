// The subset renderer (lib/kustomize.mjs) against the real kustomize: identical objects for every
// target, so the fallback used on machines without kubectl renders what kubectl would. Also
// checks that the subset renderer refuses what it does not implement instead of guessing.

import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, it } from "node:test";
import { findRealKustomize, idOf, renderSubset, strategicMerge } from "./lib/kustomize.mjs";
import { kTargets } from "./lib/repo.mjs";

const real = findRealKustomize();

describe("subset renderer", () => {
  for (const target of kTargets) {
    it(`${target.label}: same objects as the real kustomize`, (t) => {
      if (!real) {
        t.skip("no kustomize v4+ here (kubectl kustomize or kustomize); nothing to compare with");
        return;
      }
      t.diagnostic(`compared with ${real.name}`);
      const byId = (objects) => Object.fromEntries(objects.map((o) => [idOf(o), o]));
      const mine = byId(renderSubset(target.dir));
      const theirs = byId(real.render(target.dir));
      assert.deepEqual(Object.keys(mine).sort(), Object.keys(theirs).sort());
      for (const id of Object.keys(theirs)) assert.deepEqual(mine[id], theirs[id], id);
    });
  }

  it("refuses kustomization fields it does not implement", () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "sflb-kustomize-"));
    try {
      fs.writeFileSync(path.join(dir, "kustomization.yaml"),
                       "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\ncommonLabels: {a: b}\n");
      assert.throws(() => renderSubset(dir), /commonLabels.*not in the subset renderer/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it("strategic merge: containers by name, maps merged, null deletes, other lists replaced", () => {
    const base = {
      spec: {
        replicas: 2, paused: false,
        containers: [{ name: "a", image: "x", args: ["1", "2"] }, { name: "b", image: "y" }],
      },
    };
    const patch = { spec: { paused: null, containers: [{ name: "b", image: "z", args: ["3"] }] } };
    assert.deepEqual(strategicMerge(base, patch), {
      spec: {
        replicas: 2,
        containers: [{ name: "a", image: "x", args: ["1", "2"] }, { name: "b", image: "z", args: ["3"] }],
      },
    });
    assert.throws(() => strategicMerge(base, { spec: { $retainKeys: [] } }), /not in the subset/);
  });
});
