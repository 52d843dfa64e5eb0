<?php
// A client for amoauth's token API, its amoCRM API gateway and its signed events. Plain PHP 8 (json and hash only,
// no curl, no Composer): copy it into a Laravel app as app/Services/Amoauth.php.

declare(strict_types=1);

namespace App\Services;

final class AmoauthException extends \RuntimeException
{
    /** @param string $error amoauth's error code, e.g. "needs_reauth", or "unreachable" */
    public function __construct(public readonly int $status, public readonly string $error, string $message)
    {
        parent::__construct("amoauth: {$error}: {$message}", $status);
    }
}

final class Amoauth
{
    public function __construct(
        private readonly string $baseUrl,   // e.g. "http://127.0.0.1:8080" (with AMOAUTH_BASE_PATH, include it)
        private readonly string $apiKey,    // from `amoauth api-key create NAME`
        private readonly float $timeout = 15.0,
    ) {
    }

    /** A valid access token for an account (id or subdomain): account_id, subdomain, domain, access_token, expires_at. */
    public function token(string|int $account): array
    {
        return $this->request('GET', '/api/v1/connections/' . rawurlencode((string) $account) . '/token');
    }

    /** The connections, optionally only one tenant's. */
    public function connections(?string $externalId = null): array
    {
        $query = $externalId === null ? '' : '?' . http_build_query(['external_id' => $externalId]);
        return $this->request('GET', '/api/v1/connections' . $query);
    }

    /** A consent link for one tenant: ['url' => …, 'expires_at' => …]. Send the user's browser to url. */
    public function connectLink(string $externalId, string $returnUrl): array
    {
        return $this->request('POST', '/api/v1/connect-links', ['external_id' => $externalId, 'return_url' => $returnUrl]);
    }

    /**
     * Calls amoCRM's API for an account through amoauth, e.g. ($id, 'GET', 'api/v4/leads', ['limit' => 50]).
     * amoauth adds the token, paces calls to 7 a second and retries what is safe to retry.
     * Returns ['status' => amoCRM's HTTP status, 'body' => its decoded JSON, or null for an empty
     * body (204)]; throws AmoauthException when amoauth itself answers (rate_limited, circuit_open,
     * needs_reauth, path_not_forwarded…).
     */
    public function amocrm(string|int $account, string $method, string $path, array $query = [], ?array $json = null): array
    {
        $url = '/api/v1/connections/' . rawurlencode((string) $account) . '/proxy/' . ltrim($path, '/')
            . ($query === [] ? '' : '?' . http_build_query($query));
        [$status, $contentType, $body] = $this->send($method, $url, $json, 'application/hal+json, application/json');
        $decoded = $body === '' ? null : json_decode($body, true);
        // amoauth's own errors are application/json; amoCRM's are hal+json or problem+json.
        if ($status >= 400 && $contentType === 'application/json' && isset($decoded['error'])) {
            throw new AmoauthException($status, $decoded['error'], $decoded['message'] ?? "HTTP {$status}");
        }
        return ['status' => $status, 'body' => $decoded];
    }

    /**
     * Checks an event amoauth POSTed: the signature over the raw body and a recent timestamp.
     * Returns the decoded event, or null when it must be refused (answer 401 then).
     */
    public static function verifyEvent(string $secret, string $timestamp, string $signature, string $rawBody, int $maxAgeSeconds = 300): ?array
    {
        if (!ctype_digit($timestamp) || abs(time() - (int) $timestamp) > $maxAgeSeconds) {
            return null;
        }
        $expected = 'sha256=' . hash_hmac('sha256', $timestamp . '.' . $rawBody, $secret);
        if (!hash_equals($expected, $signature)) {
            return null;
        }
        $event = json_decode($rawBody, true);
        return is_array($event) ? $event : null;
    }

    private function request(string $method, string $path, ?array $json = null): array
    {
        [$status, , $body] = $this->send($method, $path, $json, 'application/json');
        $decoded = json_decode($body, true);
        if ($status >= 400 || !is_array($decoded)) {
            throw new AmoauthException($status, $decoded['error'] ?? 'bad_response', $decoded['message'] ?? "HTTP {$status}");
        }
        return $decoded;
    }

    /** @return array{int, string, string} the status, the media type and the body */
    private function send(string $method, string $path, ?array $json, string $accept): array
    {
        $headers = ["Authorization: Bearer {$this->apiKey}", "Accept: {$accept}"];
        $options = ['method' => $method, 'timeout' => $this->timeout, 'ignore_errors' => true, 'follow_location' => 0];
        if ($json !== null) {
            $headers[] = 'Content-Type: application/json';
            $options['content'] = json_encode($json, JSON_THROW_ON_ERROR);
        }
        $options['header'] = implode("\r\n", $headers);
        $body = @file_get_contents($this->baseUrl . $path, false, stream_context_create(['http' => $options]));
        if ($body === false || !isset($http_response_header[0])) {
            throw new AmoauthException(0, 'unreachable', "no answer from {$this->baseUrl}");
        }
        $status = (int) explode(' ', $http_response_header[0])[1];
        $contentType = '';
        foreach ($http_response_header as $line) {
            if (stripos($line, 'content-type:') === 0) {
                $contentType = strtolower(trim(explode(';', substr($line, 13))[0]));
            }
        }
        return [$status, $contentType, $body];
    }
}
