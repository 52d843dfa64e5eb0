<?php
// The host app's events endpoint (AMOAUTH_EVENTS_URL points here). Run with the built-in server
// for a try: AMOAUTH_EVENTS_SECRET=… EVENTS_LOG=/tmp/events.jsonl php -S 127.0.0.1:8090 events.php

declare(strict_types=1);

require __DIR__ . '/Amoauth.php';

use App\Services\Amoauth;

$event = Amoauth::verifyEvent(
    getenv('AMOAUTH_EVENTS_SECRET') ?: '',
    $_SERVER['HTTP_X_AMOAUTH_TIMESTAMP'] ?? '',
    $_SERVER['HTTP_X_AMOAUTH_SIGNATURE'] ?? '',
    file_get_contents('php://input'),
);
if ($event === null) {
    http_response_code(401);
    exit;
}
// Delivery is at least once: a real app skips ids it has already handled.
file_put_contents(getenv('EVENTS_LOG') ?: 'php://stderr', json_encode($event) . "\n", FILE_APPEND | LOCK_EX);
http_response_code(204);
