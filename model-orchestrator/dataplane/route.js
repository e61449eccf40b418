// The fast path's router, run by nginx's njs (js_content) on the fast routes: model-orchestrator/dataplane.
//
// It decides, never refuses: a request goes straight to a model's service only when everything below
// holds, and to the orchestrator otherwise, which answers it exactly as without nginx (a 401 for a bad
// key, a 404 for an unknown model, a queue for a busy one). So this file holds no policy of its own
// beyond "is this plainly a request for a ready fast-path model, from a key the orchestrator accepts".
//
// `table` is the route table the orchestrator writes (dataplane/conf.py route_table; js_preload_object):
//   {"generation": n, "keys": {"<sha256 hex>": 1, ...} | null, "routes": {"/v1/...": {"model": "@m0"}},
//    "failed": {"@m0": "<the 502 JSON for that model>"}}

var crypto = require('crypto');
var PRINTABLE = /^[\x21-\x7e]+$/;  // keys outside printable ASCII are the orchestrator's to judge
var has = Object.prototype.hasOwnProperty;

function toOrchestrator(r) {
    r.internalRedirect('@orchestrator');
}

// The one key the request presents, as model_orchestrator.auth.presented_key reads it; null when it
// presents none, several, or one the orchestrator might read differently.
function presentedKey(r) {
    var authorization = [], apiKey = [];
    var raw = r.rawHeadersIn;
    for (var i = 0; i < raw.length; i++) {
        var name = raw[i][0].toLowerCase();
        if (name === 'authorization') { authorization.push(raw[i][1]); }
        else if (name === 'x-api-key') { apiKey.push(raw[i][1]); }
    }
    var key = null;
    if (authorization.length === 1) {
        var value = authorization[0], space = value.indexOf(' ');
        if (space > 0 && value.slice(0, space).toLowerCase() === 'bearer') { key = value.slice(space + 1).trim(); }
    } else if (authorization.length === 0 && apiKey.length === 1) {
        key = apiKey[0].trim();
    }
    return key !== null && PRINTABLE.test(key) ? key : null;
}

function keyAccepted(r) {
    if (table.keys === null) { return true; }  // no key configured: the orchestrator lets every request in too
    var key = presentedKey(r);
    return key !== null && has.call(table.keys, crypto.createHash('sha256').update(key).digest('hex'));
}

// The model the JSON body names, or undefined (no body, not JSON, not an object, no string model).
function requestedModel(r) {
    var body;
    try {
        body = r.requestText;  // throws when nginx put a large body in a file: the orchestrator reads those
    } catch (e) {
        return undefined;
    }
    if (!body) { return undefined; }
    var data;
    try {
        data = JSON.parse(body);  // njs stops at 32 levels of nesting: deeper goes to the orchestrator
    } catch (e) {
        return undefined;
    }
    return data !== null && typeof data === 'object' && typeof data.model === 'string' ? data.model : undefined;
}

function route(r) {
    var models = table.routes[r.uri];
    // The raw target must be the route itself: no query, no percent-encoding, no dot segments.
    if (r.method !== 'POST' || models === undefined || r.variables.request_uri !== r.uri || !keyAccepted(r)) {
        return toOrchestrator(r);
    }
    var model = requestedModel(r);
    if (model === undefined || !has.call(models, model)) {
        return toOrchestrator(r);
    }
    r.internalRedirect(models[model]);
}

// nginx could not hand the request to the service (error_page 502/503 of a model's location): when nothing
// of it was sent (no connection, or max_conns reached), the orchestrator takes it (it queues, or restarts
// the model); once it was sent, the service may have acted on it, so it is answered 502 and not sent again.
function failed(r) {
    var sent = r.variables.upstream_bytes_sent;
    if (!sent || /^[0, :]*$/.test(sent)) {
        return toOrchestrator(r);
    }
    r.headersOut['Content-Type'] = 'application/json';
    r.return(502, table.failed[r.variables.aio_location]);
}

// GET on the control socket: the generation of the table this worker serves (a reload has taken effect).
function generation(r) {
    r.return(200, String(table.generation));
}

export default {route, failed, generation};
