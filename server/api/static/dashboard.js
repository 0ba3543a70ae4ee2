// edgeota dashboard: live refresh and rollout charts.
//
// The server renders the page with its data; this script re-renders the same
// sections from GET /dashboard/data every few seconds and draws each rollout's
// progress with uPlot (vendored: no CDN). Text from the server is only ever
// set with textContent / attribute setters, never parsed as HTML.
(function () {
  "use strict";

  var DATA_URL = "/dashboard/data";
  var charts = {}; // rollout id -> {plot, events, el}
  var dataEl = document.getElementById("dashboard-data");
  if (!dataEl) {
    return;
  }
  var pollMs = parseInt(dataEl.getAttribute("data-poll-ms"), 10) || 2000;

  // h("tag", {attr: value}, child, ...): children are strings, numbers, nodes or arrays.
  function h(tag, attrs) {
    var el = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (name) {
        var value = attrs[name];
        if (value === null || value === undefined || value === false) {
          return;
        }
        el.setAttribute(name, value === true ? "" : String(value));
      });
    }
    append(el, Array.prototype.slice.call(arguments, 2));
    return el;
  }

  function append(el, children) {
    children.forEach(function (child) {
      if (child === null || child === undefined || child === false) {
        return;
      }
      if (Array.isArray(child)) {
        append(el, child);
      } else if (child instanceof Node) {
        el.appendChild(child);
      } else {
        el.appendChild(document.createTextNode(String(child)));
      }
    });
  }

  function table(headers, rows, cls) {
    return h("table", {"class": cls || null},
      h("thead", null, h("tr", null, headers.map(function (c) { return h("th", null, c); }))),
      h("tbody", null, rows.map(function (row) {
        return h("tr", null, row.map(function (cell) { return h("td", null, cell); }));
      })));
  }

  function badge(text, kind) {
    return h("span", {"class": "badge badge-" + kind}, text);
  }

  function stat(label, value, cls) {
    return h("div", {"class": "stat " + cls}, h("span", {"class": "stat-value"}, value),
      h("span", {"class": "stat-label"}, label));
  }

  function percent(part, whole) {
    return whole ? Math.round(100 * part / whole) + "%" : "-";
  }

  function replaceChildren(el, content) {
    while (el.firstChild) {
      el.removeChild(el.firstChild);
    }
    append(el, [content]);
  }

  // -- sections (the same markup as the server renders) --------------------------------

  function renderFleet(fleet) {
    var devices = table(
      ["device", "hardware", "tags", "serving", "state", "online", "last seen"],
      fleet.devices.map(function (d) {
        return [
          d.id, d.hardware,
          Object.keys(d.tags).sort().map(function (k) {
            return h("span", {"class": "tag"}, k + "=" + d.tags[k]);
          }),
          d.serving.join(", ") || "-",
          [badge(d.state, "state"),
            d.release ? h("span", {"class": "muted"}, " " + d.release) : null,
            d.error ? h("div", {"class": "error-text"}, d.error) : null],
          d.disabled ? badge("disabled", "off")
            : badge(d.online ? "online" : "offline", d.online ? "on" : "off"),
          d.last_seen || "never"
        ];
      }), "devices");
    var shown = fleet.devices.length;
    return [
      h("div", {"class": "stats"},
        stat("devices", fleet.total, "stat-total"), stat("online", fleet.online, "stat-on"),
        stat("offline", fleet.offline, "stat-off"),
        stat("disabled", fleet.disabled, "stat-disabled")),
      h("div", {"class": "counts"},
        h("div", null, h("h3", null, "By serving version"),
          table(["model@version", "devices"],
            fleet.by_version.map(function (c) { return [c.label, c.count]; }), "compact")),
        h("div", null, h("h3", null, "By reported state"),
          table(["state", "devices"],
            fleet.by_state.map(function (c) { return [c.label, c.count]; }), "compact"))),
      shown ? devices : h("p", {"class": "empty"}, "No devices enrolled."),
      shown < fleet.total
        ? h("p", {"class": "muted"}, "Showing " + shown + " of " + fleet.total + " devices.")
        : null
    ];
  }

  function progressText(r) {
    var c = r.counts;
    var active = r.total - c.superseded;
    return "installed " + c.installed + " of " + active + " (" + percent(c.installed, active) +
      ") · failed " + c.failed + " · rolled back " + c.rolled_back + " · in progress " +
      (c.pending + c.downloading) + " · waiting " + c.waiting;
  }

  // Everything of a rollout except its chart, which lives on between refreshes.
  function rolloutParts(r, states) {
    var phaseStrip = h("ol", {"class": "phases"}, r.phase_views.map(function (p) {
      var cls = p.index === r.current_phase ? "current" : (p.started ? "done" : "upcoming");
      return h("li", {"class": cls}, p.percent + "%");
    }));
    var phaseTable = table(
      ["phase", "%", "devices"].concat(states.map(function (s) { return s.replace(/_/g, " "); })),
      r.phase_views.map(function (p) {
        return [String(p.index + 1), p.percent + "%", p.devices].concat(states.map(function (s) {
          return h("span", {"class": "n n-" + s + (p.counts[s] ? "" : " zero")}, p.counts[s]);
        }));
      }), "compact phase-table");
    var events = r.events.length ? table(["at", "event", "actor", "detail"],
      r.events.map(function (e) { return [e.at, e.kind, e.actor, e.summary]; }),
      "compact events") : null;
    var devices = table(["device", "phase", "state", "detail", "assigned", "finished"],
      r.devices.map(function (a) {
        return [a.device_id, a.phase + 1, badge(a.state, a.state), a.detail || "",
          a.assigned_at || "", a.finished_at || ""];
      }), "compact rollout-devices");
    var more = r.total - r.devices.length;
    return {
      head: [
        h("div", {"class": "rollout-head"},
          h("h3", null, "#" + r.id + " " + r.release),
          badge(r.status, "status-" + r.status),
          h("span", {"class": "phase-label"},
            "phase " + (r.current_phase + 1) + "/" + r.phases.length),
          phaseStrip),
        r.status_reason ? h("p", {"class": "reason"}, r.status_reason) : null,
        h("p", {"class": "muted meta"}, r.selector + " · created " + r.created_at + " by " +
          r.created_by + (r.finished_at ? " · finished " + r.finished_at : "")),
        h("p", {"class": "progress", "id": "progress-" + r.id}, progressText(r))
      ],
      tail: [
        h("div", {"class": "rollout-tables"},
          h("div", null, h("h4", null, "Devices per phase and state"), phaseTable),
          h("div", null, h("h4", null, "Events"),
            events || h("p", {"class": "empty"}, "No events."))),
        h("h4", null, "Devices"),
        devices,
        more > 0 ? h("p", {"class": "muted"}, "and " + more + " more") : null
      ]
    };
  }

  function renderRollouts(rollouts, states) {
    var body = document.getElementById("rollouts-body");
    var keep = {};
    var articles = rollouts.map(function (r) {
      keep[r.id] = true;
      var parts = rolloutParts(r, states);
      var article = document.getElementById("rollout-" + r.id);
      var chartEl = article ? article.querySelector(".chart") : null;
      if (!article || !chartEl) {
        article = h("article", {"class": "rollout", "id": "rollout-" + r.id, "data-rollout": r.id});
        chartEl = h("div", {"class": "chart", "id": "chart-" + r.id});
      }
      // Rebuild around the chart element so the uPlot instance survives.
      while (article.firstChild) {
        article.removeChild(article.firstChild);
      }
      append(article, [parts.head, chartEl, parts.tail]);
      return {article: article, rollout: r, chartEl: chartEl};
    });
    Object.keys(charts).forEach(function (id) {
      if (!keep[id]) {
        charts[id].plot.destroy();
        delete charts[id];
      }
    });
    if (!rollouts.length) {
      replaceChildren(body, h("p", {"class": "empty"}, "No rollouts yet."));
      return;
    }
    replaceChildren(body, articles.map(function (a) { return a.article; }));
    articles.forEach(function (a) { drawChart(a.rollout, a.chartEl); });
  }

  function renderFailures(failures) {
    if (!failures.length) {
      return h("p", {"class": "empty"}, "No failures.");
    }
    return table(["reason", "outcome", "devices", "which", "deployments"],
      failures.map(function (f) {
        return [f.reason, badge(f.state, f.state), f.count,
          f.devices.join(", ") + (f.count > f.devices.length ? " …" : ""),
          f.deployments.map(function (d) { return "#" + d; }).join(", ")];
      }), "failures");
  }

  function renderAudit(audit) {
    if (!audit.length) {
      return h("p", {"class": "empty"}, "The audit log is empty.");
    }
    return table(["#", "recorded", "actor", "action", "subject", "detail"],
      audit.map(function (a) {
        return [a.id, a.recorded_at, a.actor, a.action, a.subject, h("code", null, a.detail)];
      }), "compact audit");
  }

  // -- charts --------------------------------------------------------------------------

  var SERIES = [
    {key: "assigned", label: "assigned", stroke: "#64748b"},
    {key: "installed", label: "installed", stroke: "#16a34a"},
    {key: "failed", label: "failed", stroke: "#dc2626"},
    {key: "rolled_back", label: "rolled back", stroke: "#d97706"}
  ];

  function chartData(r) {
    return [r.series.t].concat(SERIES.map(function (s) { return r.series[s.key]; }));
  }

  function chartWidth(el) {
    return Math.max(280, Math.floor(el.getBoundingClientRect().width || el.clientWidth || 600));
  }

  // Phase starts, pauses, rollbacks: dashed vertical lines labelled with their kinds
  // (events at the same instant share one line).
  function markerGroups(events) {
    var groups = [];
    events.forEach(function (e) {
      var last = groups[groups.length - 1];
      var label = e.kind.replace(/_/g, " ");
      if (last && last.t === e.t) {
        if (last.labels.indexOf(label) < 0) {
          last.labels.push(label);
        }
      } else {
        groups.push({t: e.t, labels: [label]});
      }
    });
    return groups;
  }

  function eventMarkers(state) {
    return {
      hooks: {
        draw: [function (u) {
          var ctx = u.ctx;
          var top = u.bbox.top;
          var bottom = top + u.bbox.height;
          var px = devicePixelRatio || 1;
          ctx.save();
          ctx.lineWidth = px;
          ctx.setLineDash([4 * px, 4 * px]);
          ctx.font = Math.round(11 * px) + "px sans-serif";
          ctx.textAlign = "left";
          ctx.textBaseline = "top";
          ctx.fillStyle = "#475569";
          ctx.strokeStyle = "#94a3b8";
          markerGroups(state.events).forEach(function (g, i) {
            if (g.t < u.scales.x.min || g.t > u.scales.x.max) {
              return;
            }
            var x = Math.round(u.valToPos(g.t, "x", true));
            ctx.beginPath();
            ctx.moveTo(x, top);
            ctx.lineTo(x, bottom);
            ctx.stroke();
            ctx.fillText(g.labels.join(", "), x + 4 * px, top + (2 + (i % 3) * 13) * px);
          });
          ctx.restore();
        }]
      }
    };
  }

  function drawChart(r, el) {
    var existing = charts[r.id];
    if (existing && existing.el === el) {
      existing.state.events = r.events;
      existing.plot.setData(chartData(r));
      return;
    }
    if (existing) {
      existing.plot.destroy();
    }
    if (typeof uPlot === "undefined") {
      return;
    }
    var state = {events: r.events};
    var opts = {
      width: chartWidth(el),
      height: 220,
      scales: {x: {time: true}, y: {range: function (u, min, max) { return [0, Math.max(1, max)]; }}},
      axes: [{}, {label: "devices", size: 50}],
      series: [{}].concat(SERIES.map(function (s) {
        return {label: s.label, stroke: s.stroke, width: 2, paths: uPlot.paths.stepped({align: 1})};
      })),
      plugins: [eventMarkers(state)],
      legend: {live: false}
    };
    charts[r.id] = {plot: new uPlot(opts, chartData(r), el), state: state, el: el};
  }

  function resizeCharts() {
    Object.keys(charts).forEach(function (id) {
      var c = charts[id];
      c.plot.setSize({width: chartWidth(c.el), height: 220});
    });
  }

  // -- refresh -------------------------------------------------------------------------

  function render(data) {
    replaceChildren(document.getElementById("fleet-body"), renderFleet(data.fleet));
    renderRollouts(data.rollouts, data.assignment_states);
    replaceChildren(document.getElementById("failures-body"), renderFailures(data.failures));
    replaceChildren(document.getElementById("audit-body"), renderAudit(data.audit));
    var auditTitle = document.querySelector("#audit h2");
    if (auditTitle) {
      auditTitle.textContent = "Audit trail (last " + data.audit.length + ")";
    }
    document.getElementById("updated").textContent = "as of " + data.generated_at;
  }

  function setLive(ok, text) {
    var live = document.getElementById("live");
    live.textContent = text;
    live.className = "live " + (ok ? "on" : "off");
  }

  function poll() {
    if (document.hidden) {
      setTimeout(poll, pollMs);
      return;
    }
    fetch(DATA_URL, {credentials: "same-origin", cache: "no-store",
      headers: {"Accept": "application/json"}})
      .then(function (response) {
        if (response.status === 401) {
          window.location.assign("/login");
          return null;
        }
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.json();
      })
      .then(function (data) {
        if (data) {
          render(data);
          setLive(true, "live");
        }
      })
      .catch(function (err) {
        setLive(false, "reconnecting (" + err.message + ")");
      })
      .then(function () { setTimeout(poll, pollMs); });
  }

  function start() {
    render(JSON.parse(dataEl.textContent));
    setLive(true, "live");
    window.addEventListener("resize", resizeCharts);
    setTimeout(poll, pollMs);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
}());
