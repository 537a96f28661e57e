"""The page at ``/``: pick a class or type a prompt (a text-to-image model: any prompt), see the
images (no external assets)."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hyperscale</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:15px system-ui,sans-serif;max-width:56rem;margin:2rem auto;padding:0 1rem;color:#222}
 label{display:inline-block;margin:.3rem .8rem .3rem 0} input,select,button{font:inherit;padding:.25rem .4rem}
 #prompt{width:18rem} #images img{width:112px;height:112px;image-rendering:pixelated;margin:4px;border:1px solid #ccc}
 #status{color:#555;min-height:1.4em} .err{color:#b00020}
</style></head><body>
<h1>hyperscale</h1>
<p id="intro">Images from the distilled generator this server hosts. Pick a class or type a prompt that names one.</p>
<form id="form">
 <label id="class-label">class <select id="class"><option value="">(from prompt)</option></select></label>
 <label>prompt <input id="prompt" placeholder="a photo of a sneaker" maxlength="256"></label><br>
 <label>images <input id="num" type="number" min="1" max="16" value="4" style="width:4rem"></label>
 <label>seed <input id="seed" type="number" min="0" placeholder="random" style="width:7rem"></label>
 <label>steps <input id="steps" type="number" min="1" max="8" placeholder="default" style="width:5rem"></label>
 <label>token <input id="token" type="password" placeholder="if the server needs one" style="width:10rem"></label>
 <button id="go" type="submit">Generate</button>
</form>
<p id="status"></p><div id="images"></div>
<script>
const $ = id => document.getElementById(id);
function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("token").value) h["Authorization"] = "Bearer " + $("token").value;
  return h;
}
async function loadClasses() {
  try {
    const r = await fetch("/v1/models", {headers: headers()});
    if (!r.ok) return;
    const m = await r.json();
    m.default.classes.forEach((name, i) => {
      const o = document.createElement("option"); o.value = i; o.textContent = name; $("class").appendChild(o);
    });
    if (m.default.kind === "one-step") $("steps").disabled = true;
    if (m.default.takes === "prompts") {  // a text-to-image model: free prompts, no class list
      $("class-label").style.display = "none";
      $("prompt").placeholder = "a photo of a red bag";
      $("intro").textContent = "Images from the distilled text-to-image generator this server hosts. Type a prompt.";
    }
  } catch (e) {}
}
$("form").addEventListener("submit", async ev => {
  ev.preventDefault();
  const body = {num_images: parseInt($("num").value || "1")};
  if ($("class").value !== "") body["class"] = parseInt($("class").value);
  if ($("prompt").value.trim()) body.prompt = $("prompt").value.trim();
  if ($("seed").value !== "") body.seed = parseInt($("seed").value);
  if (!$("steps").disabled && $("steps").value !== "") body.steps = parseInt($("steps").value);
  $("status").className = ""; $("status").textContent = "generating...";
  const t0 = performance.now();
  const r = await fetch("/v1/generate", {method: "POST", headers: headers(), body: JSON.stringify(body)});
  const out = await r.json();
  if (!r.ok) { $("status").className = "err"; $("status").textContent = r.status + ": " + out.error; return; }
  $("images").innerHTML = "";
  out.images.forEach(b64 => {
    const img = document.createElement("img"); img.src = "data:image/" + out.format + ";base64," + b64;
    img.alt = out.class_name || out.prompts[0]; img.className = "generated"; $("images").appendChild(img);
  });
  $("status").textContent = out.images.length + " x " + (out.class_name || out.prompts[0]) + ", seed " + out.seed + ", " +
    Math.round(performance.now() - t0) + " ms";
});
if (!$("token").value) loadClasses();
$("token").addEventListener("change", () => { if ($("class").options.length <= 1) loadClasses(); });
</script></body></html>
"""
