"""The hub's own viewer pages: the radiologists' study list (Russian first, with English), the
script that hands the bearer token to the viewer, and OHIF's ``app-config.js``.

None of these carry patient data: the pages are static and fetch everything through
DICOMweb (QIDO-RS, WADO-RS) with the user's bearer token, which they keep in the tab's
``sessionStorage`` (key :data:`TOKEN_KEY`). A token arrives once in the link that opens the
viewer — as ``#token=…`` (a URL fragment never reaches a server) or ``?token=…`` — and is
removed from the address bar at once.
"""

from __future__ import annotations

import json

from hie.pacs.viewer_assets import MOUNT

TOKEN_KEY = "hie.viewer.token"

# Shared by every page and by OHIF's app-config.js: take the token from the URL once.
TOKEN_JS = """
(function () {
  var KEY = "__KEY__";
  function take() {
    var url = new URL(window.location.href);
    var token = url.searchParams.get("token");
    var hash = new URLSearchParams(url.hash.replace(/^#/, ""));
    if (hash.get("token")) { token = hash.get("token"); hash.delete("token"); }
    if (token) {
      try { window.sessionStorage.setItem(KEY, token); } catch (e) { /* storage off */ }
      url.searchParams.delete("token");
      var rest = hash.toString();
      url.hash = rest ? "#" + rest : "";
      window.history.replaceState(window.history.state, "", url.toString());
    }
  }
  take();
  window.hieToken = function () {
    try { return window.sessionStorage.getItem(KEY) || ""; } catch (e) { return ""; }
  };
  window.hieSetToken = function (token) {
    try { window.sessionStorage.setItem(KEY, token); } catch (e) { /* storage off */ }
  };
})();
""".replace('"__KEY__"', json.dumps(TOKEN_KEY))

# OHIF's configuration (window.config), pointing its DICOMweb data source at this hub. The
# hub's extension gives OHIF's UserAuthenticationService the bearer token, and sends the user
# back to the study list (which asks for a token) when DICOMweb answers 401.
OHIF_CONFIG_JS = (
    TOKEN_JS
    + """
(function () {
  // Russian first: OHIF's i18next reads its language from localStorage before the browser's
  // (a language chosen in OHIF's preferences is kept there and wins)
  try {
    if (!window.localStorage.getItem("i18nextLng")) {
      window.localStorage.setItem("i18nextLng", "ru");
    }
  } catch (e) { /* storage off: the browser's language */ }
  var origin = window.location.origin;
  var dicomweb = origin + "/dicomweb";
  var hieAuth = {
    id: "@hie/extension-auth",
    version: "1.0.0",
    preRegistration: function (args) {
      var auth = args.servicesManager.services.userAuthenticationService;
      auth.setServiceImplementation({
        getAuthorizationHeader: function () {
          var token = window.hieToken();
          return token ? { Authorization: "Bearer " + token } : {};
        },
        handleUnauthenticated: function () {
          window.location.assign("/viewer/?expired=1");
        },
      });
    },
  };
  window.config = {
    name: "hie",
    routerBasename: "__BASENAME__",
    extensions: [hieAuth],
    modes: [],
    // no first-visit guided tour over a radiologist's images (Global customization scope)
    customizationService: { "ohif.tours": { $set: [] } },
    showStudyList: true,
    maxNumberOfWebWorkers: 2,
    showWarningMessageForCrossOrigin: false,
    showCPUFallbackMessage: true,
    showLoadingIndicator: true,
    strictZSpacingForVolumeViewport: true,
    groupEnabledModesFirst: true,
    investigationalUseDialog: { option: "never" },
    maxNumRequests: { interaction: 100, thumbnail: 4, prefetch: 10 },
    showErrorDetails: "always",
    defaultDataSourceName: "hie",
    httpErrorHandler: function (error) {
      if (error && error.status === 401) {
        window.location.assign("/viewer/?expired=1");
      }
    },
    dataSources: [
      {
        namespace: "@ohif/extension-default.dataSourcesModule.dicomweb",
        sourceName: "hie",
        configuration: {
          friendlyName: "HIE hub DICOMweb",
          name: "hie",
          qidoRoot: dicomweb,
          wadoRoot: dicomweb,
          wadoUriRoot: dicomweb,
          qidoSupportsIncludeField: true,
          supportsReject: false,
          imageRendering: "wadors",
          thumbnailRendering: "wadors",
          enableStudyLazyLoad: true,
          supportsFuzzyMatching: false,
          supportsWildcard: true,
          staticWado: false,
          singlepart: "bulkdata,video,pdf",
          bulkDataURI: { enabled: true, relativeResolution: "studies" },
          omitQuotationForMultipartRequest: true,
        },
      },
    ],
  };
})();
""".replace('"__BASENAME__"', json.dumps(MOUNT.rstrip("/")))
)

STUDY_LIST_JS = """
(function () {
  var T = {
    ru: {
      title: "Исследования", subtitle: "Архив изображений — список исследований",
      patient: "Пациент", pid: "ID пациента", date: "Дата", modality: "Модальность",
      dateHint: "Дата (ГГГГММДД или ГГГГММДД-ГГГГММДД)",
      description: "Описание", accession: "Номер заявки", series: "Серии",
      instances: "Снимки", open: "Открыть", search: "Найти", reset: "Сбросить",
      none: "Исследований не найдено.", loading: "Загрузка…",
      noToken: "Нет токена доступа. Откройте просмотрщик по ссылке из карты пациента " +
        "или вставьте токен ниже.",
      expired: "Токен доступа недействителен или истёк. Получите новую ссылку.",
      forbidden: "Нет прав на просмотр исследований.",
      failed: "Не удалось загрузить список", token: "Токен доступа", use: "Применить",
      lang: "English", more: "Показаны первые %n исследований; уточните поиск.",
    },
    en: {
      title: "Studies", subtitle: "Image archive — study list",
      patient: "Patient", pid: "Patient ID", date: "Date", modality: "Modality",
      dateHint: "Date (YYYYMMDD or YYYYMMDD-YYYYMMDD)",
      description: "Description", accession: "Accession", series: "Series",
      instances: "Images", open: "Open", search: "Search", reset: "Reset",
      none: "No studies found.", loading: "Loading…",
      noToken: "No access token. Open the viewer from the patient's record or paste " +
        "a token below.",
      expired: "The access token is invalid or has expired. Get a new link.",
      forbidden: "You may not view studies.",
      failed: "The list could not be loaded", token: "Access token", use: "Use",
      lang: "Русский", more: "The first %n studies are shown; narrow the search.",
    },
  };
  var LIMIT = 100;
  var params = new URLSearchParams(window.location.search);
  var lang = params.get("lang") === "en" ? "en" : "ru";
  var t = T[lang];
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) { e.textContent = text; }
    return e;
  }
  function value(ds, tag) {
    var a = ds[tag];
    return a && a.Value && a.Value.length ? a.Value[0] : "";
  }
  function person(v) {
    if (!v) { return ""; }
    var s = typeof v === "object" ? (v.Alphabetic || v.Ideographic || "") : String(v);
    return s.split("=")[0].split("^").filter(Boolean).join(" ");
  }
  function date(v) {
    return /^\\d{8}$/.test(v) ? v.slice(6, 8) + "." + v.slice(4, 6) + "." + v.slice(0, 4) : v;
  }
  function all(ds, tag) {
    var a = ds[tag];
    return a && a.Value ? a.Value.join(", ") : "";
  }
  document.documentElement.lang = lang;
  document.title = t.title + " — HIE";
  document.getElementById("title").textContent = t.title;
  document.getElementById("subtitle").textContent = t.subtitle;
  var langLink = document.getElementById("lang");
  langLink.textContent = t.lang;
  langLink.href = lang === "en" ? "?lang=ru" : "?lang=en";
  var form = document.getElementById("search");
  [["PatientName", t.patient], ["PatientID", t.pid], ["StudyDate", t.dateHint],
   ["ModalitiesInStudy", t.modality]].forEach(function (f) {
    var input = el("input", { name: f[0], placeholder: f[1], "aria-label": f[1] });
    input.value = params.get(f[0]) || "";
    form.appendChild(input);
  });
  form.appendChild(el("button", { type: "submit" }, t.search));
  var status = document.getElementById("status");
  var tokenBox = document.getElementById("token-box");
  function askToken(message) {
    status.textContent = message;
    status.className = "status error";
    tokenBox.hidden = false;
    tokenBox.querySelector("label").textContent = t.token;
    tokenBox.querySelector("button").textContent = t.use;
  }
  tokenBox.addEventListener("submit", function (ev) {
    ev.preventDefault();
    var v = tokenBox.querySelector("input").value.trim();
    if (v) { window.hieSetToken(v); window.location.reload(); }
  });
  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    var q = new URLSearchParams();
    if (lang === "en") { q.set("lang", "en"); }
    Array.prototype.forEach.call(form.querySelectorAll("input"), function (i) {
      if (i.value.trim()) { q.set(i.name, i.value.trim()); }
    });
    window.location.search = q.toString();
  });
  var token = window.hieToken();
  if (!token) { askToken(t.noToken); return; }
  if (params.get("expired")) { status.textContent = t.expired; }
  var qido = new URLSearchParams();
  ["PatientName", "PatientID", "StudyDate", "ModalitiesInStudy"].forEach(function (k) {
    var v = params.get(k);
    if (v) { qido.set(k, k === "PatientName" && v.indexOf("*") < 0 ? v + "*" : v); }
  });
  qido.set("limit", String(LIMIT));
  ["00081030", "00080061", "00201206", "00201208", "00100020"].forEach(function (f) {
    qido.append("includefield", f);
  });
  status.textContent = t.loading;
  fetch("/dicomweb/studies?" + qido.toString(), {
    headers: { Authorization: "Bearer " + token, Accept: "application/dicom+json" },
  }).then(function (r) {
    if (r.status === 401) { askToken(t.expired); return null; }
    if (r.status === 403) {
      status.textContent = t.forbidden;
      status.className = "status error";
      return null;
    }
    if (r.status === 204) { return []; }
    if (!r.ok) { throw new Error(t.failed + ": HTTP " + r.status); }
    return r.json();
  }).then(function (studies) {
    if (studies === null) { return; }
    var body = document.getElementById("rows");
    body.textContent = "";
    status.className = "status";
    var more = studies.length >= LIMIT ? t.more.replace("%n", LIMIT) : "";
    status.textContent = studies.length ? more : t.none;
    studies.sort(function (a, b) {
      var ka = value(a, "00080020") + value(a, "00080030");
      return (value(b, "00080020") + value(b, "00080030")).localeCompare(ka);
    });
    studies.forEach(function (ds) {
      var uid = value(ds, "0020000D");
      var tr = el("tr", { "data-study": uid });
      var href = "/viewer/study/" + encodeURIComponent(uid);
      var link = el("a", { href: href, class: "open" }, t.open);
      [person(value(ds, "00100010")), value(ds, "00100020"), date(value(ds, "00080020")),
       all(ds, "00080061"), value(ds, "00081030"), value(ds, "00080050"),
       value(ds, "00201206"), value(ds, "00201208")].forEach(function (v) {
        tr.appendChild(el("td", {}, String(v)));
      });
      var td = el("td");
      td.appendChild(link);
      tr.appendChild(td);
      body.appendChild(tr);
    });
  }).catch(function (e) {
    status.textContent = e.message || t.failed;
    status.className = "status error";
  });
  var heads = [t.patient, t.pid, t.date, t.modality, t.description, t.accession, t.series,
               t.instances, ""];
  var headRow = document.getElementById("heads");
  heads.forEach(function (h) { headRow.appendChild(el("th", { scope: "col" }, h)); });
})();
"""

STUDY_LIST_HTML = """<!doctype html>
<html lang="ru">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>Исследования — HIE</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; margin: 0; background: #0b1722; color: #e6edf3; }
  header { display: flex; align-items: baseline; gap: 1em; padding: 12px 20px;
           background: #122537; }
  header h1 { font-size: 20px; margin: 0; }
  header .sub { color: #9fb3c8; flex: 1; }
  header a { color: #7cc4ff; }
  main { padding: 12px 20px; }
  form { display: flex; gap: 8px; flex-wrap: wrap; margin-bottom: 12px; }
  input { padding: 6px 8px; border-radius: 4px; border: 1px solid #35506b;
          background: #0f1f2e; color: inherit; }
  button { padding: 6px 14px; border-radius: 4px; border: 0; background: #2f81f7;
           color: #fff; cursor: pointer; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid #223a52; }
  th { color: #9fb3c8; font-weight: 600; }
  tr:hover td { background: #15293d; }
  a.open { color: #7cc4ff; }
  .status { margin: 8px 0; color: #9fb3c8; min-height: 1.4em; }
  .status.error { color: #ff9b8f; }
</style>
</head>
<body>
<header><h1 id="title">Исследования</h1><span class="sub" id="subtitle"></span>
<a id="lang" href="?lang=en">English</a></header>
<main>
<form id="search" role="search"></form>
<form id="token-box" hidden><label for="token-input"></label>
<input id="token-input" type="password" autocomplete="off" size="40">
<button type="submit"></button></form>
<div id="status" class="status" role="status"></div>
<table><thead><tr id="heads"></tr></thead><tbody id="rows"></tbody></table>
</main>
<script src="/viewer/token.js"></script>
<script src="/viewer/studies.js"></script>
</body>
</html>
"""

MISSING_HTML = """<!doctype html>
<html lang="ru"><head><meta charset="utf-8"><title>Просмотрщик не установлен</title></head>
<body style="font: 15px/1.5 system-ui, sans-serif; margin: 2em; max-width: 46em">
<h1>Просмотрщик изображений не установлен</h1>
<p>Файлы просмотрщика OHIF (%(package)s %(version)s) не найдены в <code>%(where)s</code>.
Администратор устанавливает их командой <code>hie viewer fetch</code>
(нужен доступ к реестру npm во время установки, не во время работы).</p>
<p lang="en"><b>The image viewer is not installed.</b> The OHIF Viewer's files (%(package)s
%(version)s) are not in <code>%(where)s</code>; an operator installs them with
<code>hie viewer fetch</code> (the npm registry is needed at install time only).</p>
<p><a href="/viewer/">Список исследований / Study list</a></p>
</body></html>
"""
