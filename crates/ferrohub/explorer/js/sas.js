// Keys, connection strings and SAS tokens for devices and modules, with WebCrypto.

function b64encode(bytes) {
  let s = '';
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s);
}

function b64decode(text) {
  const s = atob(text);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

/** A fresh symmetric key: base64 of 32 random bytes, as the Azure portal makes them. */
export function generateKey() {
  return b64encode(crypto.getRandomValues(new Uint8Array(32)));
}

export function isBase64Key(text) {
  try {
    return b64decode(text).length >= 16;
  } catch (_) {
    return false;
  }
}

export function connectionString(hostName, deviceId, key, moduleId) {
  return moduleId
    ? `HostName=${hostName};DeviceId=${deviceId};ModuleId=${moduleId};SharedAccessKey=${key}`
    : `HostName=${hostName};DeviceId=${deviceId};SharedAccessKey=${key}`;
}

/**
 * A device (or module) SAS token in IoT Hub's format:
 * SharedAccessSignature sr=<urlenc(host/devices/id)>&sig=<urlenc(base64 HMAC-SHA256)>&se=<expiry>
 */
export async function sasToken(hostName, deviceId, key, ttlSeconds, moduleId) {
  let resource = `${hostName}/devices/${encodeURIComponent(deviceId)}`;
  if (moduleId) resource += `/modules/${encodeURIComponent(moduleId)}`;
  const sr = encodeURIComponent(resource);
  const se = Math.floor(Date.now() / 1000) + Math.max(1, Math.floor(ttlSeconds));
  const cryptoKey = await crypto.subtle.importKey('raw', b64decode(key), { name: 'HMAC', hash: 'SHA-256' }, false, ['sign']);
  const sig = new Uint8Array(await crypto.subtle.sign('HMAC', cryptoKey, new TextEncoder().encode(`${sr}\n${se}`)));
  return { token: `SharedAccessSignature sr=${sr}&sig=${encodeURIComponent(b64encode(sig))}&se=${se}`, expiry: new Date(se * 1000) };
}
